"""Image quality numbers. Tensors are (B, 3, H, W) in [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB on the [0, 1] scale, after clamping the prediction. Returns (B,)."""
    pred = pred.clamp(-1, 1)
    mse = ((pred - target) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def downsample_area(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased downsampling (area average for integer factors)."""
    return F.interpolate(x, size=size, mode="area")
