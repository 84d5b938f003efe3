"""Batches for the trainers: the shard loader (images or a latent cache), or synthetic samples.

Every source yields the loader's batch dicts endlessly and has the same methods (`Batches`):
state_dict()/load_state_dict() for exact resume at the same world size, restart_at() after a
checkpoint of another world size, and skip_counts() for logging.
"""
from __future__ import annotations

import io
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from infd.data.counters import merge_counts
from infd.data.dataset import build_loader, collate
from infd.data.latents import collate_latents
from infd.data.transforms import make_patch_sample
from infd.data.workers import preemption_signals_held
from train.config import DataSourceConfig
from train.dist import DistInfo


class Batches(Protocol):
    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def restart_at(self, consumed: int, epoch: int) -> None:
        """Continue after a checkpoint of another world size: `consumed` batches of this rank
        (trainer steps x grad_accum) are done, and `epoch` is the first epoch not yet started."""

    def skip_counts(self) -> dict: ...


class ShardBatches:
    """Endless iteration over epochs of the epoch-planned shard loader.

    consumed: batches yielded over all epochs (= trainer steps x grad_accum); the workers derive
    each batch's trainer step from it (the high-res fine-tuning switch of `patch.p_keep_late`)."""

    def __init__(self, cfg: DataSourceConfig, info: DistInfo, grad_accum: int = 1, sample_fn=None, collate_fn=None):
        self.loader = build_loader(cfg.loader, info.rank, info.world_size, sample_fn, collate_fn)
        self.dataset = self.loader.dataset
        self.grad_accum = grad_accum
        self.epoch, self.batches_done, self.consumed = 0, 0, 0
        self.skips: dict[int, dict] = {}

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self.batches_done) | {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done, self.consumed = state["epoch"], state["batches"], state["consumed"]

    def restart_at(self, consumed: int, epoch: int) -> None:
        # Positions within an epoch of another world size do not map here: start the next epoch.
        self.epoch, self.batches_done, self.consumed = epoch, 0, consumed

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict({"epoch": self.epoch, "batches": self.batches_done})
            self.dataset.set_step_clock(self.consumed - self.batches_done, self.grad_accum)
            with preemption_signals_held():  # see infd/data/workers.py
                batches = iter(self.loader)  # a new iterator: the workers receive the dataset as set above
            # Closing this generator (the loop does, on every exit) drops `batches`, which stops its workers.
            for batch in batches:
                self.batches_done += 1
                self.consumed += 1
                self.skips[batch["worker"]] = batch["skips"]
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0

    def skip_counts(self) -> dict:
        return merge_counts(self.skips)


def synthetic_image(seed: int, index: int, size: int) -> bytes:
    """A smooth random picture (a few coloured blobs over a gradient) as PNG bytes."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = rng.uniform(0, 1, 3)[None, None] + (xx[..., None] * rng.uniform(-0.5, 0.5, 3) +
                                               yy[..., None] * rng.uniform(-0.5, 0.5, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-0.8, 0.8, 3)
    stripes = 0.1 * np.sin(2 * np.pi * (xx * rng.integers(4, 24) + yy * rng.integers(4, 24)))
    img = np.clip(img + stripes[..., None], 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


SYNTHETIC_CAPTIONS = ("a red square", "a blue circle", "a green field", "a grey sky")


def synthetic_latent(seed: int, index: int, channels: int, size: int) -> dict:
    """A smooth random latent (C, size, size) (low-frequency noise plus a per-channel offset),
    with a caption and a label from a small set."""
    rng = np.random.default_rng([seed, index])
    coarse = torch.from_numpy(rng.standard_normal((1, channels, 4, 4)).astype(np.float32))
    z = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    z = z + torch.from_numpy(rng.normal(0, 0.5, (channels, 1, 1)).astype(np.float32))
    k = int(rng.integers(len(SYNTHETIC_CAPTIONS)))
    return {"z": z, "caption": SYNTHETIC_CAPTIONS[k], "label": k, "key": str(index)}


class SyntheticBatches:
    """Global micro-batch m of size B x world holds samples [m*B*world, (m+1)*B*world); rank r takes
    its B. Sample i depends only on (seed, i), so global batches do not depend on the world size."""

    def __init__(self, cfg: DataSourceConfig, info: DistInfo, make_sample, collate_fn):
        """make_sample(i) -> sample dict; collate_fn(samples, worker, skips) -> batch."""
        self.info, self.batch_size = info, cfg.loader.batch_size
        self.make_sample, self.collate_fn = make_sample, collate_fn
        self.micro_batches = 0

    def state_dict(self) -> dict:
        return {"micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches = state["micro_batches"]

    def restart_at(self, consumed: int, epoch: int) -> None:  # the position is world-size independent
        self.micro_batches = consumed

    def __iter__(self) -> Iterator[dict]:
        while True:
            base = (self.micro_batches * self.info.world_size + self.info.rank) * self.batch_size
            samples = [self.make_sample(i) for i in range(base, base + self.batch_size)]
            self.micro_batches += 1
            yield self.collate_fn(samples, 0, {})

    def skip_counts(self) -> dict:
        return {}


def synthetic_images(cfg: DataSourceConfig, info: DistInfo) -> SyntheticBatches:
    syn, patch = cfg.synthetic, cfg.loader.patch

    def make_sample(i: int) -> dict:
        sample = make_patch_sample(synthetic_image(syn.seed, i, syn.image_size), patch,
                                   np.random.default_rng([syn.seed, i, 1]))
        return sample | {"key": str(i), "is_hr": False, "caption": ""}

    return SyntheticBatches(cfg, info, make_sample, collate)


def synthetic_latents(cfg: DataSourceConfig, info: DistInfo, channels: int) -> SyntheticBatches:
    syn = cfg.synthetic
    return SyntheticBatches(cfg, info, lambda i: synthetic_latent(syn.seed, i, channels, syn.latent_size),
                            collate_latents)


def to_device(batch: dict, device: torch.device) -> dict:
    from infd.data.transforms import to_unit_range

    return {"enc": to_unit_range(batch["enc"].to(device, non_blocking=True)),
            "gt": to_unit_range(batch["gt"].to(device, non_blocking=True)),
            "coords": batch["coords"].to(device, non_blocking=True),
            "cells": batch["cells"].to(device, non_blocking=True)}
