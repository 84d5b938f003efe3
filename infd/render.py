"""Tiled rendering: any output size, or any sub-region of it, with memory bounded by the tile.

Tiles lie on one grid anchored at the top-left pixel of the full output, whatever region is
asked for, and each tile is rendered with `pad` pixels of context on every side (clipped to the
image). So a region render is the crop of the full tiled render for every renderer, and for a
strictly local renderer (pad >= receptive radius) the tiled render equals the whole render.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from infd.geometry import crop_queries

Box = tuple[int, int, int, int]  # (top, left, bottom, right), pixels of the full output


def tile_boxes(size: tuple[int, int], region: Box, tile: int) -> Iterator[Box]:
    """Boxes of the global tile grid of an image of `size` that intersect `region`, clipped to it."""
    top, left, bottom, right = region
    for y0 in range(top // tile * tile, bottom, tile):
        for x0 in range(left // tile * tile, right, tile):
            yield (max(y0, top), max(x0, left), min(y0 + tile, bottom), min(x0 + tile, right))


def padded_tile(size: tuple[int, int], box: Box, tile: int, pad: int) -> Box:
    """The full grid tile holding `box`, grown by `pad` on each side and clipped to the image."""
    y0, x0 = box[0] // tile * tile, box[1] // tile * tile
    return (max(y0 - pad, 0), max(x0 - pad, 0),
            min(y0 + tile + pad, size[0]), min(x0 + tile + pad, size[1]))


@dataclass(frozen=True)
class RenderOptions:
    """How `render_tiles` splits and runs a render. Only `pad` (below the receptive radius: an error)
    and `precision` change pixels; the rest trade memory for speed.

    tile: output pixels per tile side (the paper renders in tiles of the training patch size: with
      GroupNorm a tile's statistics span its window); pad: context pixels rendered around each tile;
    batch_pixels: query pixels per renderer call, so that several same-shape tiles go through the
      renderer at once (at least one tile per call, whatever its size); the activations of one call
      bound the memory: CLIF at hidden 256 in fp32 holds about 7 KB per query pixel (measured);
    precision: "bf16" renders under a bf16 autocast (output in fp32; docs/benchmarks.md gives its PSNR
      against fp32).
    """
    tile: int = 256
    pad: int = 8
    batch_pixels: int = 1 << 19
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self):
        if self.tile < 1 or self.pad < 0 or self.batch_pixels < 1 or self.precision not in ("fp32", "bf16"):
            raise ValueError(f"RenderOptions {self}: tile >= 1, pad >= 0, batch_pixels >= 1 and precision "
                             "fp32 or bf16")


@torch.no_grad()
def render_tiles(renderer: nn.Module, phi: Tensor, size: tuple[int, int], region: Box | None = None,
                 options: RenderOptions | None = None, progress: bool = False) -> Tensor:
    """Render `region` of an output of `size` (H, W) from phi, tile by tile.

    renderer: any module with forward(phi, coords, cells) and `receptive_radius`.
    phi (B, C, h, w) on the compute device. region (top, left, bottom, right); default: all.
    options: RenderOptions() by default.
    Returns (B, 3, bottom - top, right - left) float32 on the CPU: only the padded tiles of one
    renderer call (options.batch_pixels) have activations on the device at a time.
    """
    options = options or RenderOptions()
    radius = getattr(renderer, "receptive_radius", 0)
    if options.pad < radius:
        raise ValueError(f"pad={options.pad} is below the renderer's receptive radius {radius}; "
                         f"use pad >= {radius} or tiles will show seams")
    region = region or (0, 0, size[0], size[1])
    _check_region(size, region)
    top, left, bottom, right = region
    b = phi.shape[0]
    out = torch.empty(b, 3, bottom - top, right - left, dtype=torch.float32)
    boxes = list(tile_boxes(size, region, options.tile))
    bar = _maybe_tqdm(len(boxes), progress)
    for group in _call_groups(size, boxes, options, b):
        windows = [window for window, _ in group]
        rgb = _render_windows(renderer, phi, size, windows, options.precision)
        for i, (window, box) in enumerate(group):
            inner = rgb[i * b:(i + 1) * b, :, box[0] - window[0]:box[2] - window[0],
                        box[1] - window[1]:box[3] - window[1]]
            out[:, :, box[0] - top:box[2] - top, box[1] - left:box[3] - left] = inner.float().cpu()
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return out


def _call_groups(size: tuple[int, int], boxes: list[Box], options: RenderOptions, batch: int):
    """The (padded window, tile box) pairs of each renderer call: windows of one shape, at most
    options.batch_pixels query pixels (B images x tiles) per call, at least one tile."""
    by_shape: dict[tuple[int, int], list[tuple[Box, Box]]] = {}
    for box in boxes:
        window = padded_tile(size, box, options.tile, options.pad)
        by_shape.setdefault((window[2] - window[0], window[3] - window[1]), []).append((window, box))
    for (h, w), pairs in by_shape.items():
        per_call = max(1, options.batch_pixels // (batch * h * w))
        for i in range(0, len(pairs), per_call):
            yield pairs[i:i + per_call]


def _render_windows(renderer: nn.Module, phi: Tensor, size: tuple[int, int], windows: list[Box],
                    precision: str) -> Tensor:
    """Render same-shape windows in one call: (len(windows) * B, 3, h, w), window-major."""
    b, k = phi.shape[0], len(windows)
    queries = [crop_queries(size, window, b, phi.device) for window in windows]
    coords = torch.cat([c for c, _ in queries]) if k > 1 else queries[0][0]
    cells = torch.cat([c for _, c in queries]) if k > 1 else queries[0][1]
    if k > 1:  # one image: a view of phi per window; several: copies, window-major
        phi = phi.expand(k, *phi.shape[1:]) if b == 1 else phi.repeat(k, 1, 1, 1)
    autocast = torch.autocast(phi.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        return renderer(phi, coords, cells)


def render_whole(renderer: nn.Module, phi: Tensor, size: tuple[int, int]) -> Tensor:
    """Render the full output in one call (memory grows with H x W). Returns (B, 3, H, W)."""
    coords, cells = crop_queries(size, (0, 0, size[0], size[1]), phi.shape[0], phi.device)
    return renderer(phi, coords, cells)


def _check_region(size: tuple[int, int], region: Box) -> None:
    top, left, bottom, right = region
    if not (0 <= top < bottom <= size[0] and 0 <= left < right <= size[1]):
        raise ValueError(f"region (top, left, bottom, right) = {region} must lie inside the output "
                         f"of size (H, W) = {size} and be non-empty")


def _maybe_tqdm(total: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="render tiles", unit="tile")
