"""What the loader hands a stage: one typed batch per source, and its bookkeeping beside it.

A DataLoader worker yields (batch, LoaderNote); infd.data.loader.Loader keeps the note (the
position after the batch, the worker's skip and read counts) and hands the stage the batch alone.
Images travel as uint8 (a quarter of float32 through the worker queues and to the device) and
become float in [-1, 1] in `to(device)`, on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from infd.data.transforms import to_unit_range


def _moved(batch, fn):
    """`batch` with fn applied to each of its tensor fields (None and lists stay)."""
    return replace(batch, **{f.name: fn(v) for f in fields(batch) if isinstance(v := getattr(batch, f.name), Tensor)})


@dataclass
class PatchBatch:
    """B image samples (stage 1; stage 2 on image shards).

    enc (B, 3, E, E): the whole square resized to the encoder's input size.
    gt (B, 3, P, P), coords and cells (B, P, P, 2): a multi-scale GT crop and its query grid, or
    None where the stage does not train on them (data.loader.patch.gt=false: stage 2's default).
    r (B,): the size the GT square was downsampled to; is_hr, kept (B,) bool: drawn from the
    high-res stream, kept at its original resolution. keys, captions: B strings.
    lowres (B, 3, E, E), lowres_scale (B,): super-resolution pairs (data.loader.patch.lowres), the encoder
    input's degraded low-resolution view and its scale factor; None otherwise.
    enc, gt and lowres are uint8 until to(device), float in [-1, 1] after.
    """

    enc: Tensor
    gt: Tensor | None
    coords: Tensor | None
    cells: Tensor | None
    r: Tensor
    is_hr: Tensor
    kept: Tensor
    keys: list[str]
    captions: list[str]
    lowres: Tensor | None = None
    lowres_scale: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device) -> PatchBatch:
        moved = _moved(self, lambda t: t.to(device, non_blocking=True))
        images = {k: to_unit_range(getattr(moved, k)) for k in ("enc", "gt", "lowres") if getattr(moved, k) is not None}
        return replace(moved, **images)

    def pin_memory(self) -> PatchBatch:
        return _moved(self, Tensor.pin_memory)


@dataclass
class LatentBatch:
    """B cached latents (stage 2 on a latent cache, data_prep.encode_latents).

    z (B, C, h, w) float; labels (B,) long (-1: none); text (B, L, D) cached text embeddings or None;
    keys, captions: B strings.
    """

    z: Tensor
    labels: Tensor
    keys: list[str]
    captions: list[str]
    text: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device) -> LatentBatch:
        return _moved(self, lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> LatentBatch:
        return _moved(self, Tensor.pin_memory)


@dataclass
class LoaderNote:
    """The bookkeeping of the worker that built a batch: the loader's position after it (global,
    see infd.data.loader), the worker's id and its cumulative skip and read counts."""

    position: dict
    worker: int
    skips: dict = field(default_factory=dict)
    reads: dict = field(default_factory=dict)
