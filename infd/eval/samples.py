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
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from infd.diffusion.generate import LatentDiffusion, generate_latents
from infd.diffusion.spec import Conditioning, SamplingSpec
from infd.image import pil_to_tensor, tensor_to_pil
from infd.render import RenderOptions, render_tiles


class ImageSampler:
    """A UNet with its schedule (model) + an autoencoder -> renders of samples by index.

    spec: how each sample is drawn; seed: sample i's noise seed is seed + i; latent_size: the side
    of the sampled latent; prompts: text models' prompts, sample i takes prompts[i % len] ("" when
    empty); captions: a RealSet whose captions are the prompts instead (sample i: real image i mod
    its size), read by the rank that draws the sample; render: how the images are rendered
    (tiles bound the memory of a 1024 render).
    """

    def __init__(self, model: LatentDiffusion, ae, spec: SamplingSpec, seed: int, latent_size: int,
                 prompts: list[str] = (), captions=None, render: RenderOptions | None = None):
        self.model, self.ae, self.spec, self.seed, self.latent_size = model, ae, spec, seed, latent_size
        self.spec_prompts, self.captions = list(prompts), captions
        self.render_options = render or RenderOptions()
        self._batch_captions = {}

    def prompts(self, indices: list[int]) -> list[str]:
        """The prompts of samples `indices` ("" without any)."""
        if self.captions is None:
            p = self.spec_prompts
            return [p[i % len(p)] if p else "" for i in indices]
        key = tuple(indices)
        if key not in self._batch_captions:  # read once per batch: for its render and its CLIP score
            n = len(self.captions.ids)
            self._batch_captions = {key: [self.captions.caption(i % n) for i in indices]}
        return self._batch_captions[key]

    def _labels(self, indices: list[int]) -> Tensor | None:
        n = getattr(self.model.unet.cfg, "num_classes", 0)
        return torch.tensor([i % n for i in indices], device=self.model.device) if n else None

    @torch.no_grad()
    def render(self, indices: list[int], sizes: list[int]) -> dict[int, Tensor]:
        """{size: (B, 3, size, size) in [-1, 1], on the CPU} for samples `indices`."""
        shape = (len(indices), self.model.unet.cfg.in_channels, self.latent_size, self.latent_size)
        cond = Conditioning(self.prompts(indices) if self.model.text is not None else None, self._labels(indices))
        z = generate_latents(self.model, self.spec, cond, shape, [self.seed + i for i in indices])
        phi = self.ae.decode(z)
        return {size: render_tiles(self.ae.renderer, phi, (size, size), options=self.render_options) for size in sizes}


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
