"""Generated images for evaluation: sample i from (seed, i) alone, rendered at several sizes.

Sample i draws its initial noise from seed + i (as image i of `infd sample --seed S`), takes
prompt i mod len(prompts) for a text model (or, with captions, the caption of real image i mod n:
the COCO protocol, where each sample answers a real image's caption) and label i mod num_classes
for a class-conditional one, so it is the same in any batch, on any rank, at any world size. Its
latent is decoded once and the field rendered at every evaluation size (1024 for pFID, 256 for
FID-256): the image at 256 is a render at 256, not a downsampled 1024.

`SampleStore` keeps the renders as PNGs (written to a temporary name and renamed, so a killed
run leaves only whole files); a rerun reuses them. PNG holds exactly the 8-bit values the
feature networks quantise to, so features from a reloaded sample equal those of a fresh one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from infd.image import pil_to_tensor, tensor_to_pil
from infd.render import render_tiles
from infd.sampling import generate_latents


@dataclass
class SamplingSpec:
    """How evaluation samples are drawn (the `infd sample` options of the same names)."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "linspace"
    cfg_scale: float = 1.0
    latent_size: int = 64
    prompts: list[str] = field(default_factory=list)  # text models: sample i gets prompts[i % len]
    tile: int = 256  # render tile side: bounds the memory of a 1024 render


class ImageSampler:
    """unet + autoencoder (+ text encoder) -> renders of samples by index.

    diffusion_cfg, latent_scale: the UNet's schedule and latent scale (its export records both).
    captions: a RealSet whose captions are the prompts (sample i: real image i mod its size), read
    by the rank that draws the sample; None: spec.prompts cycle.
    """

    def __init__(self, unet, ae, text, diffusion_cfg, latent_scale: float, spec: SamplingSpec, seed: int, device,
                 captions=None):
        self.unet, self.ae, self.text, self.spec = unet, ae, text, spec
        self.diffusion_cfg, self.latent_scale, self.seed, self.device = diffusion_cfg, latent_scale, seed, device
        self.captions, self._batch_captions = captions, {}

    def prompts(self, indices: list[int]) -> list[str]:
        """The prompts of samples `indices` ("" without any)."""
        if self.captions is None:
            p = self.spec.prompts
            return [p[i % len(p)] if p else "" for i in indices]
        key = tuple(indices)
        if key not in self._batch_captions:  # read once per batch: for its render and its CLIP score
            n = len(self.captions.ids)
            self._batch_captions = {key: [self.captions.caption(i % n) for i in indices]}
        return self._batch_captions[key]

    def _labels(self, indices: list[int]) -> Tensor | None:
        n = getattr(self.unet.cfg, "num_classes", 0)
        return torch.tensor([i % n for i in indices], device=self.device) if n else None

    @torch.no_grad()
    def render(self, indices: list[int], sizes: list[int]) -> dict[int, Tensor]:
        """{size: (B, 3, size, size) in [-1, 1], on the CPU} for samples `indices`."""
        s = self.spec
        shape = (len(indices), self.unet.cfg.in_channels, s.latent_size, s.latent_size)
        prompts = self.prompts(indices) if self.text is not None else None
        z = generate_latents(self.unet, self.diffusion_cfg, self.latent_scale, shape, prompts, self.text,
                             s.cfg_scale, s.sampler, s.steps, seed=[self.seed + i for i in indices],
                             device=self.device, labels=self._labels(indices), eta=s.eta, spacing=s.spacing)
        phi = self.ae.decode(z)
        return {size: render_tiles(self.ae.renderer, phi, (size, size), tile=s.tile) for size in sizes}


class SampleStore:
    """PNG renders of samples under `root`: root/<size>/<index:06d>.png."""

    def __init__(self, root: str | Path, sizes: list[int]):
        self.root, self.sizes = Path(root), list(sizes)

    def path(self, index: int, size: int) -> Path:
        return self.root / str(size) / f"{index:06d}.png"

    def complete(self, index: int) -> bool:
        return all(self.path(index, s).is_file() for s in self.sizes)

    def load(self, indices: list[int]) -> dict[int, Tensor]:
        """{size: (B, 3, size, size) in [-1, 1]}."""
        return {s: torch.stack([pil_to_tensor(Image.open(self.path(i, s))) for i in indices]) for s in self.sizes}

    def save(self, indices: list[int], renders: dict[int, Tensor]) -> None:
        for size in self.sizes:
            for index, image in zip(indices, renders[size]):
                path = self.path(index, size)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tensor_to_pil(image).save(tmp, format="PNG")
                os.replace(tmp, path)


def samples_of(sampler: ImageSampler, store: SampleStore | None, indices: list[int], sizes: list[int]
               ) -> tuple[dict[int, Tensor], int]:
    """Renders of the batch `indices` ({size: (B, 3, size, size)}), from the store when all of them
    are there, else drawn (as a whole batch: its float results then match the first run's bit for
    bit) and stored; and how many were reused. Without a store every sample is drawn."""
    if store is None:
        return sampler.render(indices, sizes), 0
    if all(store.complete(i) for i in indices):
        return store.load(indices), len(indices)
    store.save(indices, sampler.render(indices, sizes))
    return store.load(indices), 0
