"""Image tensors <-> files. Tensors are (B, 3, H, W) or (3, H, W) floats in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


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


def resize_antialiased(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to (H, W) with an antialiasing filter (Lanczos on downscale, bicubic on upscale)."""
    h, w = size
    resample = Image.LANCZOS if h * w < img.height * img.width else Image.BICUBIC
    return img.resize((w, h), resample)


def save_image(x: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(x).save(path)
    return path
