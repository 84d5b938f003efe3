"""Synthetic samples: sample i depends only on (seed, i), so a global batch is the same at any
world size (comparing distributed runs, smoke tests). An endless source for the loader."""
from __future__ import annotations

import io
from functools import partial

import numpy as np
import torch
from PIL import Image

from infd.data.image_samples import collate_patches
from infd.data.latents import collate_latents
from infd.data.transforms import PatchConfig, make_patch_sample

SYNTHETIC_CAPTIONS = ("a red square", "a blue circle", "a green field", "a grey sky")


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


def synthetic_patch(seed: int, size: int, patch: PatchConfig, index: int) -> dict:
    """The multi-scale patch sample of synthetic image `index` (its crop keyed by (seed, index))."""
    sample = make_patch_sample(synthetic_image(seed, index, size), patch, np.random.default_rng([seed, index, 1]))
    return sample | {"caption": ""}


def synthetic_latent(seed: int, channels: int, size: int, index: int) -> dict:
    """A smooth random latent (C, size, size) (low-frequency noise plus a per-channel offset),
    with a caption and a label from a small set."""
    rng = np.random.default_rng([seed, index])
    coarse = torch.from_numpy(rng.standard_normal((1, channels, 4, 4)).astype(np.float32))
    z = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    z = z + torch.from_numpy(rng.normal(0, 0.5, (channels, 1, 1)).astype(np.float32))
    k = int(rng.integers(len(SYNTHETIC_CAPTIONS)))
    return {"z": z, "caption": SYNTHETIC_CAPTIONS[k], "label": k}


class SyntheticSource:
    """Endless: slot g holds sample g. make_sample(i) -> sample dict (picklable, for workers)."""

    size = None
    hr_size = 0

    def __init__(self, make_sample, collate_fn):
        self.make_sample, self.collate_fn = make_sample, collate_fn

    def order(self, seed: int, epoch: int, block: int) -> SyntheticSource:
        return self

    @staticmethod
    def sample_id(position: int) -> int:
        return position

    def read(self, sample_id: int) -> int:
        return sample_id

    def decode(self, sample_id: int, rng: np.random.Generator, cfg) -> dict:
        return self.make_sample(sample_id) | {"key": str(sample_id)}


def synthetic_images(seed: int, size: int, patch: PatchConfig) -> SyntheticSource:
    return SyntheticSource(partial(synthetic_patch, seed, size, patch), collate_patches)


def synthetic_latents(seed: int, channels: int, size: int) -> SyntheticSource:
    return SyntheticSource(partial(synthetic_latent, seed, channels, size), collate_latents)
