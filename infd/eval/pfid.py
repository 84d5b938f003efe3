"""pFID P/1K as the INFD paper defines it (section 5, "pFID metric"), and FID at 256.

Generated images are rendered at 1024x1024; a real image's centre square is resized to 1024
(Lanczos, antialiased), and real images whose short side is below 1024 are skipped and counted
(the paper evaluates fixed high-resolution images; the official code's resize_images.py skips
them too). One random PxP crop per image, P in {256, 512, 1024} (P = 1024 is the whole image);
the feature network resizes each crop to 299 itself. FID-256: the whole image at 256 (rendered
at 256; real centre squares resized to 256).

The crop position of image i is drawn from a generator keyed by (seed, i, P) only, so it does
not depend on batching, worker order or world size.
"""
from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np
from PIL import Image
from torch import Tensor

from infd.eval.reconstruction import centre_square
from infd.image import pil_to_tensor, resize_antialiased

PFID_SIZE = 1024  # the "1K" of pFID P/1K
PATCHES = (256, 512, 1024)
FID_SIZE = 256
_CROP_TAG = zlib.crc32(b"pfid-crop")  # keeps these draws apart from other uses of the same seed


def size_name(pixels: int) -> str:
    """1024 -> "1k", 512 -> "512": the paper's way of writing sizes."""
    return f"{pixels // 1024}k" if pixels % 1024 == 0 else str(pixels)


def pfid_name(patch: int, suffix: str = "", size: int = PFID_SIZE) -> str:
    """Metric name: pfid_name(256) = "pfid_256_1k"; suffix "_randinit" for a random-init net."""
    return f"pfid_{size_name(patch)}_{size_name(size)}{suffix}"


def fid_name(size: int = FID_SIZE, suffix: str = "") -> str:
    """Metric name of FID on whole images at `size`: "fid_256" (+ suffix)."""
    return f"fid_{size}{suffix}"


def random_crop_box(size: int, patch: int, seed: int, index: int) -> tuple[int, int]:
    """(top, left) of the PxP crop of image `index` in a size x size image, uniform over all
    positions; a function of (seed, index, patch) only."""
    if not 0 < patch <= size:
        raise ValueError(f"patch {patch} must be in (0, {size}]")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(patch), _CROP_TAG]))
    top, left = rng.integers(0, size - patch + 1, size=2)
    return int(top), int(left)


def crop(image: Tensor, box: tuple[int, int], patch: int) -> Tensor:
    """image (3, S, S) (or (B, 3, S, S)), box (top, left) -> (3, P, P) (or (B, 3, P, P))."""
    top, left = box
    if top < 0 or left < 0 or top + patch > image.shape[-2] or left + patch > image.shape[-1]:
        raise ValueError(f"crop {box} + {patch} outside an image of {tuple(image.shape[-2:])}")
    return image[..., top:top + patch, left:left + patch]


def pfid_crops(image: Tensor, seed: int, index: int, patches: Iterable[int] = PATCHES) -> dict[int, Tensor]:
    """image (3, S, S) (S = 1024 for pFID) -> {P: (3, P, P)}, one random crop per patch size."""
    size = image.shape[-1]
    if image.shape[-2] != size:
        raise ValueError(f"pFID crops come from square images, got {tuple(image.shape)}")
    return {p: crop(image, random_crop_box(size, p, seed, index), p) for p in patches}


def real_square(img: Image.Image, size: int) -> Tensor | None:
    """PIL image -> its centre square resized to size x size, (3, size, size) in [-1, 1];
    None (skip) when the short side is below `size`.

    Exact Lanczos (PIL's filter without reducing_gap, as the official code's resize_images.py),
    so the real statistics match those of the paper's preprocessing up to 8-bit rounding.
    """
    if min(img.size) < size:
        return None
    square = centre_square(img.convert("RGB"))
    if square.size != (size, size):
        square = resize_antialiased(square, (size, size), reducing_gap=None)
    return pil_to_tensor(square)
