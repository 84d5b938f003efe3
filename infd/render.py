"""Tiled rendering: any output size, or any sub-region of it, with memory bounded by the tile.

Tiles lie on one grid anchored at the top-left pixel of the full output, whatever region is
asked for, and each tile is rendered with `pad` pixels of context on every side (clipped to the
image). So a region render is the crop of the full tiled render for every renderer, and for a
strictly local renderer (pad >= receptive radius) the tiled render equals the whole render.
"""
from __future__ import annotations

from typing import Iterator

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


@torch.no_grad()
def render_tiles(renderer: nn.Module, phi: Tensor, size: tuple[int, int], region: Box | None = None,
                 tile: int = 256, pad: int = 8, progress: bool = False) -> Tensor:
    """Render `region` of an output of `size` (H, W) from phi, tile by tile.

    renderer: any module with forward(phi, coords, cells) and `receptive_radius`.
    phi (B, C, h, w) on the compute device. region (top, left, bottom, right); default: all.
    Returns (B, 3, bottom - top, right - left) float32 on the CPU: only one padded tile's
    activations live on the device at a time.
    """
    radius = getattr(renderer, "receptive_radius", 0)
    if pad < radius:
        raise ValueError(f"pad={pad} is below the renderer's receptive radius {radius}; "
                         f"use pad >= {radius} or tiles will show seams")
    region = region or (0, 0, size[0], size[1])
    _check_region(size, region)
    top, left, bottom, right = region
    out = torch.empty(phi.shape[0], 3, bottom - top, right - left, dtype=torch.float32)
    boxes = list(tile_boxes(size, region, tile))
    for box in _maybe_tqdm(boxes, progress):
        window = padded_tile(size, box, tile, pad)
        coords, cells = crop_queries(size, window, phi.shape[0], phi.device)
        rgb = renderer(phi, coords, cells)
        inner = rgb[:, :, box[0] - window[0]:box[2] - window[0], box[1] - window[1]:box[3] - window[1]]
        out[:, :, box[0] - top:box[2] - top, box[1] - left:box[3] - left] = inner.float().cpu()
    return out


def render_whole(renderer: nn.Module, phi: Tensor, size: tuple[int, int]) -> Tensor:
    """Render the full output in one call (memory grows with H x W). Returns (B, 3, H, W)."""
    coords, cells = crop_queries(size, (0, 0, size[0], size[1]), phi.shape[0], phi.device)
    return renderer(phi, coords, cells)


def _check_region(size: tuple[int, int], region: Box) -> None:
    top, left, bottom, right = region
    if not (0 <= top < bottom <= size[0] and 0 <= left < right <= size[1]):
        raise ValueError(f"region (top, left, bottom, right) = {region} must lie inside the output "
                         f"of size (H, W) = {size} and be non-empty")


def _maybe_tqdm(items, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="render tiles", unit="tile")
