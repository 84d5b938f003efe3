"""Turn raw items into one WebDataset shard: filter, keep or convert the bytes, write the tar.

Each sample: {key}.{jpg|png|webp} with the original bytes when usable, and {key}.json with
key, width, height (upright), caption, format, converted_from and the source metadata.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from infd.data.decode import SkipSample, decode_rgb, needs_conversion, open_image, oriented_size
from infd.data.histogram import HISTOGRAM_EDGES, histogram_bin

EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LAION_COLUMNS = {"punsafe": ("punsafe",), "pwatermark": ("pwatermark",),
                 "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")}

log = logging.getLogger("data_prep.build_shards")


@dataclass
class FilterConfig:
    min_side: int = 256
    max_pixels: int = 179_000_000
    max_aspect: float = 3.0
    max_punsafe: float | None = 0.5
    max_pwatermark: float | None = 0.8
    min_aesthetic: float | None = None
    hr_threshold: int = 1024  # long side at least this -> high-res
    verify: bool = True  # decode (at 1/8 scale for JPEG) to catch truncated files


def laion_value(meta: dict, name: str):
    for column in LAION_COLUMNS[name]:
        if meta.get(column) is not None:
            return float(meta[column])
    return None


def check_filters(width: int, height: int, meta: dict, cfg: FilterConfig) -> None:
    if min(width, height) < cfg.min_side:
        raise SkipSample("too_small", f"{width}x{height} < min_side {cfg.min_side}")
    if max(width, height) / min(width, height) > cfg.max_aspect:
        raise SkipSample("aspect_ratio", f"{width}x{height} beyond {cfg.max_aspect}")
    for name, limit, worse in (("punsafe", cfg.max_punsafe, float.__gt__),
                               ("pwatermark", cfg.max_pwatermark, float.__gt__),
                               ("aesthetic", cfg.min_aesthetic, float.__lt__)):
        value = laion_value(meta, name)
        if limit is not None and value is not None and worse(value, float(limit)):
            raise SkipSample(f"laion_{name}", f"{name}={value}")


def prepare_image(data: bytes, cfg: FilterConfig):
    """-> (bytes to store, ext, width, height, format, converted_from or None). Raises SkipSample."""
    img = open_image(data, cfg.max_pixels)
    width, height = oriented_size(img)
    fmt, reason = img.format, needs_conversion(img)
    return img, width, height, fmt, reason


def encode_converted(img, fmt: str) -> tuple[bytes, str]:
    """Re-encode an image that cannot be kept: JPEG stays JPEG (q95), everything else PNG."""
    rgb = decode_rgb(img)
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, "JPEG", quality=95)
        return buf.getvalue(), "jpg"
    rgb.save(buf, "PNG")
    return buf.getvalue(), "png"


class ShardWriter:
    """Writes one tar atomically (tmp then rename) and gathers its statistics."""

    def __init__(self, path: Path, cfg: FilterConfig):
        self.path, self.cfg = path, cfg
        self.tmp = path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.stats = {"name": path.name, "samples": 0, "hr": 0, "skipped": Counter(), "converted": Counter(),
                      "ignored": Counter(), "histogram": [0] * len(HISTOGRAM_EDGES)}

    def skip(self, reason: str, detail: str = "") -> None:
        self.stats["skipped"][reason] += 1

    def ignore(self, reason: str, detail: str = "") -> None:
        """Part of a sample left out (a sidecar .json that does not parse): counted, and logged for
        the first few of each reason per shard; the image is kept."""
        self.stats["ignored"][reason] += 1
        if self.stats["ignored"][reason] <= 3:
            log.warning("%s: %s; the image is kept without it (%s)", reason, detail, self.path.name)

    def add(self, item: dict) -> None:
        try:
            self._add(item)
        except SkipSample as err:
            self.skip(err.reason, str(err))

    def _add(self, item: dict) -> None:
        meta = item.get("meta") or {}
        img, width, height, fmt, reason = prepare_image(item["data"], self.cfg)
        check_filters(width, height, meta, self.cfg)
        if reason is None:
            data, ext = item["data"], EXT_OF_FORMAT[fmt]
            if self.cfg.verify:
                decode_rgb(img, (max(1, width // 8), max(1, height // 8)))
        else:
            data, ext = encode_converted(img, fmt)
            self.stats["converted"][reason] += 1
        key = item["key"]
        record = {"key": key, "width": width, "height": height, "caption": item.get("caption"), "format": fmt,
                  "converted_from": reason, "source": item.get("source"), "meta": meta}
        self._write(f"{key}.{ext}", data)
        self._write(f"{key}.json", json.dumps(record, default=str).encode())
        self.stats["samples"] += 1
        self.stats["histogram"][histogram_bin(max(width, height))] += 1
        if max(width, height) >= self.cfg.hr_threshold:
            self.stats["hr"] += 1

    def _write(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: identical reruns
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> dict:
        self.tar.close()
        os.replace(self.tmp, self.path)
        stats = dict(self.stats, bytes=self.path.stat().st_size, finished=time.time())
        for name in ("skipped", "converted", "ignored"):
            stats[name] = dict(stats[name])
        return stats

