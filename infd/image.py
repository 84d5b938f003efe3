"""Image tensors <-> files. Tensors are (B, 3, H, W) or (3, H, W) floats in [-1, 1]."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

LANCZOS_SUPPORT = 3.0  # PIL's Lanczos: 3 lobes, support 3 input pixels x the downscale factor
# A downscale by more than twice this first averages whole blocks of pixels (PIL's `reducing_gap`)
# so that the Lanczos pass still downscales by at least this much: a 2000 px square to 256 costs
# a quarter of the exact filter's time. Measured on 2-3K photos (0-255 levels, tests/test_resampling.py):
# within mean 0.2 / max 2 of the exact Lanczos; a gap of 2 gave max 7.
REDUCING_GAP = 4.0


def pil_to_tensor(img: Image.Image) -> Tensor:
    """PIL image (any mode) -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def tensor_to_pil(x: Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> RGB PIL image (values clamped)."""
    x = x.detach().float().cpu()
    x = x[0] if x.ndim == 4 else x
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def resize_antialiased(img: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float] | None = None,
                       reducing_gap: float | None = REDUCING_GAP) -> Image.Image:
    """The one resampling rule for encoder inputs and ground truths: Lanczos (3 lobes).

    img: PIL image; size: output (H, W); box: (x0, y0, x1, y1) region of img in pixel-edge
    coordinates, fractional allowed (default: all of img). Returns a W x H image of that region.
    PIL scales the kernel's support with the downscale factor, so a downscale is antialiased;
    the same filter upscales (the official INFD code uses Lanczos both ways). Pixels of img
    outside the box but within the kernel's reach are used (the kernel is clipped and
    renormalised only at img's borders): a window of an image resamples exactly like the same
    window of the whole image's resize. Always horizontal pass first, then vertical: one call of
    PIL picks the order from the geometry, and the 8-bit intermediate (clipped ringing) then
    makes the same region differ by up to ~10 levels on photos between, e.g., a crop and a box.
    reducing_gap: see REDUCING_GAP; None is the exact filter (the reference in tests).
    """
    h, w = size
    x0, y0, x1, y1 = box if box is not None else (0, 0, img.width, img.height)
    # Only the pixels the taps can reach (PIL: support x scale, +-0.5 rounding): the horizontal
    # pass would otherwise run over every row of a large image for a small window.
    reach_x, reach_y = (LANCZOS_SUPPORT * max(span / n, 1.0) + 1 for span, n in ((x1 - x0, w), (y1 - y0, h)))
    cut = (max(0, math.floor(x0 - reach_x)), max(0, math.floor(y0 - reach_y)),
           min(img.width, math.ceil(x1 + reach_x)), min(img.height, math.ceil(y1 + reach_y)))
    if cut != (0, 0, img.width, img.height):
        img = img.crop(cut)
    rows = img.resize((w, img.height), Image.LANCZOS, box=(x0 - cut[0], 0, x1 - cut[0], img.height),
                      reducing_gap=reducing_gap)
    return rows.resize((w, h), Image.LANCZOS, box=(0, y0 - cut[1], w, y1 - cut[1]), reducing_gap=reducing_gap)


def save_image(x: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(x).save(path)
    return path
