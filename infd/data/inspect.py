"""Looking at a dataset: index statistics with a histogram plot, and a grid of what the loader makes.

Both read only what training reads: the sample index, and batches from the loader itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from infd.data.sample_index import SampleIndex


def index_stats(index: SampleIndex) -> dict:
    """Totals, the long-side histogram, exclusion and build counts of an index."""
    meta = index.meta
    sizes = index.samples[["width", "height"]] if len(index.samples) else None
    long_side = np.maximum(sizes["width"], sizes["height"]) if sizes is not None else np.zeros(0)
    keep = long_side > 0
    return {"shards": len(index.shard_names), "samples": meta["total_samples"], "high_res": meta["total_hr"],
            "hr_threshold": meta["hr_threshold"], "excluded": meta["total_excluded"], "bytes": meta["total_bytes"],
            "excluded_by_reason": meta.get("skipped", {}), "build": meta.get("build", {}),
            "long_side_median": float(np.median(long_side[keep])) if keep.any() else None,
            "resolution_histogram": meta["resolution_histogram"]}


def histogram_png(stats: dict, path: Path, width: int = 640, height: int = 320) -> Path:
    """A bar chart of the long-side histogram (PIL only), the high-res threshold marked."""
    hist = stats["resolution_histogram"]
    edges, counts = hist["edges"], hist["counts"]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top = max(max(counts), 1)
    bar_w = (width - 40) // len(counts)
    for i, count in enumerate(counts):
        x0 = 20 + i * bar_w
        bar_h = int((height - 80) * count / top)
        hr = edges[i] >= stats["hr_threshold"]
        draw.rectangle([x0 + 4, height - 40 - bar_h, x0 + bar_w - 4, height - 40],
                       fill=(200, 80, 60) if hr else (70, 110, 190))
        draw.text((x0 + 6, height - 36), f">={edges[i]}", fill="black")
        draw.text((x0 + 6, height - 54 - bar_h), str(count), fill="black")
    draw.text((20, 10), f"{stats['samples']} samples, long side (px, upright); "
                        f"red: high-res >= {stats['hr_threshold']}, "
                        f"{stats['high_res']}; excluded {stats['excluded']}", fill="black")
    img.save(path)
    return path


def crop_box(coords: torch.Tensor, r: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in the r x r image of a crop whose pixel centres are `coords`
    (P, P, 2) in [-1, 1], (y, x)."""
    p = coords.shape[0]
    top = int(round(float(coords[0, 0, 0] + 1) * r / 2 - 0.5))
    left = int(round(float(coords[0, 0, 1] + 1) * r / 2 - 0.5))
    return left, top, left + p, top + p


def preview_grid(batches, n: int, path: Path, cell: int = 192) -> Path:
    """Rows of (encoder input | GT crop), each labelled with r, the crop box and its stream."""
    rows = []
    for batch in batches:
        for i in range(len(batch)):
            rows.append((batch.enc[i], batch.gt[i], int(batch.r[i]), bool(batch.is_hr[i]),
                         crop_box(batch.coords[i], int(batch.r[i])), batch.keys[i]))
            if len(rows) == n:
                break
        if len(rows) == n:
            break
    img = Image.new("RGB", (2 * cell + 20, len(rows) * (cell + 24) + 4), "white")
    draw = ImageDraw.Draw(img)
    for k, (enc, gt, r, is_hr, box, key) in enumerate(rows):
        y = k * (cell + 24) + 20
        for j, tile in enumerate((enc, gt)):
            pil = Image.fromarray(tile.permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            img.paste(pil, (4 + j * (cell + 12), y))
        draw.text((4, y - 16), f"{key}: r={r} crop={box} {'high-res' if is_hr else 'main'}", fill="black")
    img.save(path)
    return path
