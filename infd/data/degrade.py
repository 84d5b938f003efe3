"""The low-resolution view of a training image for super-resolution (issue 28): the encoder input (the
high-resolution target, E x E) downsampled by a scale factor drawn from [scale_min, scale_max], optionally
blurred and JPEG-compressed, and brought back to E x E, every resampling through the project's one rule
(infd.image.resize_antialiased), so that the frozen encoder turns it into a condition on the latent grid.

Every draw comes from the sample's own generator, keyed by (seed, epoch, slot) in the loader, in a fixed
order whatever the options (scale, blur?, sigma, jpeg?, quality): the same slot gives the same view at any
world size, and switching a degradation on does not move the other draws.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from infd.config import ConfigError
from infd.image import resize_antialiased


@dataclass
class LowResConfig:
    """data.loader.patch.lowres: the super-resolution pairs (off by default)."""

    enabled: bool = False
    scale_min: float = 2.0  # downscale factor range, drawn uniformly
    scale_max: float = 8.0
    blur_p: float = 0.0  # probability of a Gaussian blur before downsampling
    blur_sigma: tuple[float, float] = (0.2, 2.0)  # its sigma range, pixels of the E x E image
    jpeg_p: float = 0.0  # probability of JPEG compression after downsampling
    jpeg_quality: tuple[int, int] = (30, 95)  # its quality range

    def validate(self, prefix: str = "") -> None:
        if not 1.0 <= self.scale_min <= self.scale_max:
            raise ConfigError(f"config keys '{prefix}scale_min' / '{prefix}scale_max' = {self.scale_min}, "
                              f"{self.scale_max}: expected 1 <= scale_min <= scale_max")
        for name in ("blur_p", "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config key '{prefix}{name}' = {getattr(self, name)}: expected a probability")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ConfigError(f"config key '{prefix}jpeg_quality' = {list(self.jpeg_quality)}: expected "
                              "[low, high] within 1..100")


def low_res_view(image: Image.Image, cfg: LowResConfig, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """(the degraded low-resolution view of `image` at its own size, the scale factor drawn)."""
    scale = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    blur, sigma = rng.random() < cfg.blur_p, float(rng.uniform(*cfg.blur_sigma))
    jpeg, quality = rng.random() < cfg.jpeg_p, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(sigma))
    small = (max(1, round(image.height / scale)), max(1, round(image.width / scale)))
    low = resize_antialiased(image, small)
    if jpeg:
        buffer = io.BytesIO()
        low.save(buffer, format="JPEG", quality=quality)
        low = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return resize_antialiased(low, (image.height, image.width)), scale
