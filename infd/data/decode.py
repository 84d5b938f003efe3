"""Decoding images from shard bytes: every mode to RGB, EXIF orientation, pixel limits, and
reduced-size JPEG decoding (DCT scaling) when only a smaller image is needed.

Bad bytes raise `SkipSample` with a reason; callers count the reasons and move on.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_TRANSPOSED = {5, 6, 7, 8}
ORIENTATION_TAG = 0x0112
DEFAULT_MAX_PIXELS = 179_000_000  # twice PIL's bomb threshold; 13K x 13K
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}  # image files, by name


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only (no pixel decode). Raises SkipSample for empty, non-image or oversized data."""
    if not data:
        raise SkipSample("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipSample("too_many_pixels", str(err)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SkipSample("not_an_image", str(err)) from None
    if img.width * img.height > max_pixels:
        raise SkipSample("too_many_pixels", f"{img.width}x{img.height} > {max_pixels} pixels")
    return img


def orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF is common on the web; treat as upright
        return 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, after the EXIF orientation."""
    return (img.height, img.width) if orientation(img) in _TRANSPOSED else (img.width, img.height)


def decode_rgb(img: Image.Image, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode to an upright RGB image.

    min_size (width, height), upright: a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) whose result is still at least this large; other formats decode at full size.
    """
    if min_size is not None and img.format == "JPEG":
        want = min_size[::-1] if orientation(img) in _TRANSPOSED else min_size
        img.draft("RGB", (max(1, int(want[0])), max(1, int(want[1]))))
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SkipSample("corrupt_image", str(err)) from None
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited over white; 16/32-bit scales to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_rgb(img)
    return img.convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    top = 1.0 if img.mode == "F" else (65535.0 if arr.max() > 255 else 255.0)
    arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, "L").convert("RGB")


def needs_conversion(img: Image.Image) -> str | None:
    """Why the encoded bytes cannot be kept as they are (None when they can)."""
    if img.format not in ("JPEG", "PNG", "WEBP"):
        return f"format_{img.format or 'unknown'}"
    if img.mode in ("RGB", "L"):
        return None
    if img.mode == "P" and "transparency" not in img.info:
        return None
    return f"mode_{img.mode}"


def image_files(folder) -> list:
    """The image files directly in `folder` (by suffix), sorted by name; a folder without any is a ConfigError."""
    from pathlib import Path

    from infd.config import ConfigError

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"image folder {folder}: not a directory")
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise ConfigError(f"image folder {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found
