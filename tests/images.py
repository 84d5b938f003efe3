"""Small synthetic images and shard sets for tests (no dependency on ../shared)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content so JPEG stays small: low-res noise upscaled.
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    return img.convert(mode) if mode != "RGB" else img


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def sixteen_bit_png(width: int, height: int) -> bytes:
    arr = (np.linspace(0, 65535, width * height).reshape(height, width)).astype(np.uint16)
    return png_bytes(Image.fromarray(arr))  # uint16 -> mode I;16


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    img = noise_image(width, height, 5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def write_folder(root: Path, sizes: list[tuple[int, int]], seed: int = 0, captions: bool = True) -> list[Path]:
    """JPEGs of the given (width, height) with sidecar captions; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        path = sub / f"img{i:04d}.jpg"
        path.write_bytes(jpeg_bytes(noise_image(w, h, seed + i)))
        if captions:
            path.with_suffix(".txt").write_text(f"caption {i}")
        paths.append(path)
    return paths


def build(src: Path, dst: str, *extra: str) -> dict:
    from data_prep.build_shards import build as build_shards, parse_args

    return build_shards(parse_args(["--input", str(src), "--output", dst, "--workers", "1", *extra]))
