"""Training samples from one image: encoder input and a multi-scale ground-truth patch.

Per image (DESIGN.md): take a square of side S = min(W, H) (the neural field is square),
resize it to the encoder size (256) with antialiasing; draw r uniform in [P, min(S, r_max)]
(or keep r = S with probability p_keep), conceptually downsample the square to r x r and cut
one P x P crop at a random position. Only the crop window is resampled, from a JPEG decoded
at the smallest DCT scale that still covers r: that is what makes the pipeline fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from infd.config import ConfigError
from infd.data.decode import DEFAULT_MAX_PIXELS, SkipSample, decode_rgb, open_image, oriented_size
from infd.geometry import crop_queries


@dataclass
class PatchConfig:
    patch_size: int = 256  # P
    r_max: int = 1024  # largest downsampled size
    encoder_size: int = 256
    p_keep: float = 0.0  # probability of keeping the GT at its original resolution (r = S)
    small: Literal["skip", "upsample"] = "skip"  # images with S < P
    square: Literal["random", "center"] = "random"
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_decode: bool = True  # reduced-size JPEG decode

    def validate(self, prefix: str = "") -> None:
        if self.r_max < self.patch_size:
            raise ConfigError(f"config key '{prefix}r_max' = {self.r_max} must be >= patch_size = {self.patch_size}")
        if not 0.0 <= self.p_keep <= 1.0:
            raise ConfigError(f"config key '{prefix}p_keep' = {self.p_keep} must be a probability in [0, 1]")


@dataclass
class PatchPlan:
    """Where the sample comes from, in upright original pixels."""

    square: tuple[int, int, int]  # (top, left, side)
    r: int  # the square is downsampled to r x r
    crop: tuple[int, int]  # (top, left) of the P x P crop in the r x r image
    kept: bool  # r == side by p_keep


def plan_patch(width: int, height: int, cfg: PatchConfig, rng: np.random.Generator) -> PatchPlan:
    side = min(width, height)
    p = cfg.patch_size
    if side < p and cfg.small == "skip":
        raise SkipSample("too_small", f"{width}x{height} < patch {p}")
    kept = side >= p and rng.random() < cfg.p_keep
    if side < p:
        r = p
    elif kept:
        r = side
    else:
        r = int(rng.integers(p, min(side, cfg.r_max) + 1))
    if cfg.square == "random":
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    else:
        top, left = (height - side) // 2, (width - side) // 2
    crop = (int(rng.integers(0, r - p + 1)), int(rng.integers(0, r - p + 1)))
    return PatchPlan((top, left, side), r, crop, kept)


def _source_box(plan: PatchPlan, box_in_r: tuple[float, float, float, float], scale: tuple[float, float]):
    """A box (top, left, bottom, right) of the r x r image -> PIL box (x0, y0, x1, y1) in the decoded image."""
    top, left, side = plan.square
    k = side / plan.r
    sx, sy = scale
    t, l, b, r = box_in_r
    return ((left + l * k) * sx, (top + t * k) * sy, (left + r * k) * sx, (top + b * k) * sy)


def _to_uint8_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def make_patch_sample(data: bytes, cfg: PatchConfig, rng: np.random.Generator) -> dict:
    """Encoded image bytes -> training sample.

    Returns enc (3, E, E) uint8, gt (3, P, P) uint8, coords and cells (P, P, 2) of the crop in
    the r x r image, r, kept, the upright original size (W, H) and the square (top, left, side)
    it was cut from. Raises SkipSample.
    """
    img = open_image(data, cfg.max_pixels)
    width, height = oriented_size(img)
    plan = plan_patch(width, height, cfg, rng)
    side, need = plan.square[2], max(plan.r, cfg.encoder_size)
    min_size = (math.ceil(width * need / side), math.ceil(height * need / side)) if cfg.fast_decode else None
    rgb = decode_rgb(img, min_size)
    scale = (rgb.width / width, rgb.height / height)
    p, (ct, cl) = cfg.patch_size, plan.crop
    gt = rgb.resize((p, p), Image.BICUBIC, box=_source_box(plan, (ct, cl, ct + p, cl + p), scale))
    enc = rgb.resize((cfg.encoder_size,) * 2, Image.BICUBIC, box=_source_box(plan, (0, 0, plan.r, plan.r), scale))
    coords, cells = crop_queries((plan.r, plan.r), (ct, cl, ct + p, cl + p))
    return {"enc": _to_uint8_tensor(enc), "gt": _to_uint8_tensor(gt), "coords": coords[0], "cells": cells[0],
            "r": plan.r, "kept": plan.kept, "size": (width, height), "square": plan.square}


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 image tensor -> float in [-1, 1] (do this on the device, after the transfer)."""
    return x.float() / 127.5 - 1.0
