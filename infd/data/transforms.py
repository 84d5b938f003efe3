"""Training samples from one image: encoder input and a multi-scale ground-truth patch.

Per image (docs/data.md, "What a sample is"): take a square of side S = min(W, H) (the neural field is square),
resize it to the encoder size (256) with antialiasing; draw r uniform in [P, min(S, r_max)]
(or keep r = S with probability p_keep), conceptually downsample the square to r x r and cut
one P x P crop at a random position. Only the crop window is resampled, from a JPEG decoded
at a reduced DCT scale (see DECODE_OVERSAMPLE): that is what makes the pipeline fast.
Both resamplings go through `infd.image.resize_antialiased` (Lanczos), like every other
encoder input in the project (latent cache, evaluation, CLI).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from infd.config import ConfigError
from infd.data.degrade import LowResConfig, low_res_view
from infd.data.decode import DEFAULT_MAX_PIXELS, SkipSample, decode_rgb, open_image, orientation, oriented_size
from infd.geometry import crop_queries
from infd.image import resize_antialiased

# Reduced-size JPEG decoding (DCT scaling 1/2, 1/4, 1/8) is the loader's speed, but libjpeg's
# scaled IDCT is a crude block-wise low-pass: resampling its output with Lanczos matches Lanczos
# on the full decode only when the Lanczos step itself still downscales by a good factor. The
# encoder input (the square to encoder_size) is therefore resampled from the smallest DCT scale
# that keeps DECODE_OVERSAMPLE x encoder_size pixels across the square; the GT from the one that
# keeps patch.gt_decode_oversample x r. 3 was chosen from a sweep on 2-3K photos with fine texture
# (q90; 0-255 levels, worst mean / max abs difference to a full decode + the exact Lanczos):
# oversampling 1 (the smallest scale covering the target) 2.8 / 40, 2: 0.5 / 7, 3: 0.3 / 4,
# 4: 0.2 / 3. The errors and speed as they stand are in docs/data.md ("Reduced-size JPEG decode",
# from tests/test_resampling.py and benchmarks/loader_throughput.py).
DECODE_OVERSAMPLE = 3.0
# EXIF orientation -> whether the upright x / y axes run against the stored ones (the decoded
# image's partial last pixel then sits at the upright start of that axis).
_REVERSED = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True),
             8: (False, True)}


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
    # High-res fine-tuning (paper H.2): from trainer step p_keep_late_step on, p_keep becomes
    # p_keep_late (None: never). The dataset switches per batch from its step clock.
    p_keep_late: float | None = None
    p_keep_late_step: int = 0
    # The GT's reduced decode keeps this many x r pixels across the square (see DECODE_OVERSAMPLE):
    # 1 is the fastest loader (libjpeg's DCT scaling then does most of the downsampling, over ten
    # levels from Lanczos at worst on fine texture); 4 is within a few levels of the full decode, at
    # about half the loader's speed on 2-4K images (the paper configs: its GT is Lanczos). Measured
    # figures: docs/data.md.
    gt_decode_oversample: float = 1.0
    # Build the GT crop and its query grid. Stage 2 on image shards encodes the encoder input alone
    # and turns this off (its default), unless it trains on pixels too.
    gt: bool = True
    # Super-resolution pairs: a degraded low-resolution view of the encoder input (infd/data/degrade.py).
    lowres: LowResConfig = field(default_factory=LowResConfig)

    def validate(self, prefix: str = "") -> None:
        if self.r_max < self.patch_size:
            raise ConfigError(f"config key '{prefix}r_max' = {self.r_max} must be >= patch_size = {self.patch_size}")
        if not 0.0 <= self.p_keep <= 1.0:
            raise ConfigError(f"config key '{prefix}p_keep' = {self.p_keep} must be a probability in [0, 1]")
        if self.p_keep_late is not None and not 0.0 <= self.p_keep_late <= 1.0:
            raise ConfigError(f"config key '{prefix}p_keep_late' = {self.p_keep_late} must be null or a "
                              "probability in [0, 1]")
        if self.gt_decode_oversample < 1:
            raise ConfigError(f"config key '{prefix}gt_decode_oversample' = {self.gt_decode_oversample} must be >= 1")
        if self.p_keep_late_step < 0:
            raise ConfigError(f"config key '{prefix}p_keep_late_step' = {self.p_keep_late_step} must be >= 0")

    def late(self) -> PatchConfig:
        """This config as it applies from step p_keep_late_step on (itself when p_keep_late is None)."""
        return self if self.p_keep_late is None else replace(self, p_keep=self.p_keep_late)


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


def _dct_scale(img: Image.Image, side: int, target: int, cfg: PatchConfig, oversample: float) -> int:
    """Denominator d of the reduced JPEG decode for resampling the square to `target` pixels."""
    if not cfg.fast_decode or img.format != "JPEG":
        return 1
    return next((d for d in (8, 4, 2) if side / d >= oversample * target), 1)


@dataclass
class _Decoded:
    """An upright RGB decode at 1/d: original point x (upright) is at (x + pad_x) / d in it."""

    rgb: Image.Image
    d: int
    pad: tuple[int, int]  # (pad_x, pad_y)

    def box(self, plan: PatchPlan, window: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """window (top, left, bottom, right) of the r x r image -> PIL box (x0, y0, x1, y1) in rgb."""
        top, left, side = plan.square
        t, win_left, b, r = window
        # side * win_left / plan.r rather than a precomputed ratio: exact at the square's far edge, which
        # may coincide with the image border where PIL rejects a box even 1e-13 too large.
        x = [(left + side * v / plan.r + self.pad[0]) / self.d for v in (win_left, r)]
        y = [(top + side * v / plan.r + self.pad[1]) / self.d for v in (t, b)]
        return (x[0], y[0], x[1], y[1])


def _decode(data: bytes, size: tuple[int, int], d: int, cfg: PatchConfig, img: Image.Image | None = None) -> _Decoded:
    """Encoded bytes (or their parsed header `img`, not yet loaded) -> decode at 1/d, upright."""
    width, height = size
    img = img if img is not None else open_image(data, cfg.max_pixels)
    # Floor sizes: PIL's draft then picks exactly 1/d (the largest scale not below the request).
    rgb = decode_rgb(img, (width // d, height // d) if d > 1 else None)
    if rgb.size == (width, height):
        return _Decoded(rgb, 1, (0, 0))
    if rgb.size != (-(-width // d), -(-height // d)):  # libjpeg's output is ceil(original / d)
        return _decode(data, size, 1, cfg)  # an unexpected scale: positions unknown, decode in full
    # The last decoded pixel of an axis covers fewer than d originals: where EXIF orientation
    # reverses the axis it comes first, and every position shifts by the missing part.
    rev = _REVERSED.get(orientation(img), (False, False))
    pad = tuple(n * d - full if r else 0 for n, full, r in zip(rgb.size, size, rev))
    return _Decoded(rgb, d, pad)


def centre_encoder_input(data: bytes, size: int) -> Image.Image:
    """An image's centre square resized to size x size (resize_antialiased).

    A JPEG is decoded at the smallest DCT scale that keeps DECODE_OVERSAMPLE x size pixels across
    the square, with the loader's decode (the square's position is exact at any scale and EXIF
    orientation). DCT scaling is a crude low-pass: keeping only `size` pixels was up to 9 levels
    (mean) off a full decode on photos, 3x keeps it within about 1 (tests/test_encode_latents.py).
    Used by data_prep.encode_latents.
    Only the square's pixels are resampled, as from the cropped full decode: an image decoded
    at full size gives exactly centre_square + resize_antialiased."""
    img = open_image(data)
    width, height = oriented_size(img)
    side = min(width, height)
    cfg = PatchConfig(encoder_size=size)
    decoded = _decode(data, (width, height), _dct_scale(img, side, size, cfg, DECODE_OVERSAMPLE), cfg, img)
    square = PatchPlan(((height - side) // 2, (width - side) // 2, side), side, (0, 0), False)
    x0, y0, x1, y1 = decoded.box(square, (0, 0, side, side))
    cut = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
    box = (x0 - cut[0], y0 - cut[1], x1 - cut[0], y1 - cut[1])
    return resize_antialiased(decoded.rgb.crop(cut), (size, size), box=box)


def _to_uint8_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def make_patch_sample(data: bytes, cfg: PatchConfig, rng: np.random.Generator) -> dict:
    """Encoded image bytes -> training sample.

    Returns enc (3, E, E) uint8 (the square, Lanczos-resized), gt (3, P, P) uint8 (a crop of the
    square Lanczos-resized to r x r), coords and cells (P, P, 2) of the crop in the r x r image
    (these three None with cfg.gt off: the decode then only serves the encoder input),
    r, kept, the upright original size (W, H) and the square (top, left, side) it was cut from;
    with cfg.lowres on, lowres (3, E, E) uint8 (infd/data/degrade.py) and lowres_scale.
    Both are `resize_antialiased` of a window of the whole image (the filter sees the pixels
    around the window, also beyond the square, like resizing the whole image and cropping).
    Raises SkipSample.
    """
    img = open_image(data, cfg.max_pixels)
    size = oriented_size(img)
    plan = plan_patch(*size, cfg, rng)
    p, (ct, cl), e, side = cfg.patch_size, plan.crop, cfg.encoder_size, plan.square[2]
    # One decode serves both; the encoder input's larger downscale box-averages first (REDUCING_GAP).
    d = _dct_scale(img, side, e, cfg, DECODE_OVERSAMPLE)
    if cfg.gt:
        d = min(d, _dct_scale(img, side, plan.r, cfg, cfg.gt_decode_oversample))
    dec = _decode(data, size, d, cfg, img)
    enc = resize_antialiased(dec.rgb, (e, e), box=dec.box(plan, (0, 0, plan.r, plan.r)))
    sample = {"enc": _to_uint8_tensor(enc), "gt": None, "coords": None, "cells": None, "r": plan.r,
              "kept": plan.kept, "size": size, "square": plan.square}
    if cfg.gt:
        gt = resize_antialiased(dec.rgb, (p, p), box=dec.box(plan, (ct, cl, ct + p, cl + p)))
        coords, cells = crop_queries((plan.r, plan.r), (ct, cl, ct + p, cl + p))
        sample |= {"gt": _to_uint8_tensor(gt), "coords": coords[0], "cells": cells[0]}
    if cfg.lowres.enabled:  # drawn after every other draw of the sample: turning it on moves none of them
        low, scale = low_res_view(enc, cfg.lowres, rng)
        sample |= {"lowres": _to_uint8_tensor(low), "lowres_scale": scale}
    return sample


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 image tensor -> float in [-1, 1] (do this on the device, after the transfer)."""
    return x.float() / 127.5 - 1.0
