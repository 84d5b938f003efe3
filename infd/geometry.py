"""Coordinates, cells and nearest-feature queries (conventions in docs/design.md).

Coordinates are pixel centres of the whole image in [-1, 1], ordered (y, x). A crop of an
image rendered (or downsampled) at size H x W keeps the coordinates of its pixels in
whole-image units, so a crop and the full grid agree pixel for pixel. A cell is the pixel
size in the same units: (2/H, 2/W).
"""
from __future__ import annotations

import torch
from torch import Tensor


def pixel_centres(n: int, start: int = 0, stop: int | None = None, device=None) -> Tensor:
    """Centres of pixels start..stop-1 of an axis of n pixels, in [-1, 1]. Shape (stop-start,)."""
    stop = n if stop is None else stop
    idx = torch.arange(start, stop, device=device, dtype=torch.float64)
    return (-1 + (2 * idx + 1) / n).float()


def crop_coord_grid(size: tuple[int, int], box: tuple[int, int, int, int], device=None) -> Tensor:
    """Coordinates of the pixels of `box` = (top, left, bottom, right) of an image of `size` (H, W).

    Returns (h, w, 2) with h = bottom - top, w = right - left, order (y, x).
    """
    height, width = size
    top, left, bottom, right = box
    ys = pixel_centres(height, top, bottom, device)
    xs = pixel_centres(width, left, right, device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def coord_grid(size: tuple[int, int], device=None) -> Tensor:
    """Coordinates of every pixel of an image of `size` (H, W). Shape (H, W, 2)."""
    return crop_coord_grid(size, (0, 0, size[0], size[1]), device)


def cell_grid(size: tuple[int, int], shape: tuple[int, int], device=None) -> Tensor:
    """Cells (2/H, 2/W) of an image of `size` (H, W), repeated over a grid `shape` (h, w). Shape (h, w, 2)."""
    cell = torch.tensor([2.0 / size[0], 2.0 / size[1]], device=device)
    return cell.expand(shape[0], shape[1], 2).clone()


def crop_queries(size: tuple[int, int], box: tuple[int, int, int, int], batch: int = 1, device=None):
    """Coords and cells of a crop `box` (top, left, bottom, right) of an image of `size`, batched.

    Returns coords (B, h, w, 2) and cells (B, h, w, 2).
    """
    coords = crop_coord_grid(size, box, device)
    cells = cell_grid(size, coords.shape[:2], device)
    return coords.expand(batch, *coords.shape), cells.expand(batch, *cells.shape)


def nearest_index(coords: Tensor, n: int) -> Tensor:
    """Index of the feature cell (of n along this axis) whose area contains each coordinate.

    Ties on a cell border go to the upper cell (floor); out-of-range coordinates clamp.
    """
    return torch.floor((coords + 1) * (n / 2)).long().clamp_(0, n - 1)


def query_nearest(feat: Tensor, coords: Tensor, cells: Tensor, shift: tuple[float, float] = (0.0, 0.0)):
    """Nearest feature vector of `feat` for each query, with relative coordinate and cell.

    feat (B, C, h, w); coords, cells (B, H, W, 2). `shift` (in feature cells, (y, x)) looks up
    the cell containing coords + shift instead, for LIIF's local ensemble; the relative
    coordinate is always measured from the unshifted query.
    Returns q_feat (B, C, H, W), rel_coord (B, 2, H, W) = (coord - feature centre) * (h, w),
    rel_cell (B, 2, H, W) = cell * (h, w). rel_coord lies in [-1, 1] when shift is 0.
    """
    b, c, h, w = feat.shape
    iy = nearest_index(coords[..., 0] + shift[0] * 2 / h, h)
    ix = nearest_index(coords[..., 1] + shift[1] * 2 / w, w)
    flat = (iy * w + ix).flatten(1)  # (B, H*W)
    q_feat = feat.flatten(2).gather(2, flat.unsqueeze(1).expand(b, c, flat.shape[1]))
    q_feat = q_feat.view(b, c, *coords.shape[1:3])
    size = coords.new_tensor([h, w])
    centre = torch.stack([-1 + (2 * iy + 1) / h, -1 + (2 * ix + 1) / w], dim=-1).to(coords.dtype)
    rel_coord = ((coords - centre) * size).permute(0, 3, 1, 2)
    rel_cell = (cells * size).permute(0, 3, 1, 2)
    return q_feat, rel_coord, rel_cell


def box_queries(canvas: tuple[int, int], box: tuple[int, int, int, int], out_size: tuple[int, int], batch: int = 1,
                device=None, dtype=torch.float32, pad: int = 0):
    """Coords and cells that render `box` (top, left, bottom, right) of a canvas of size (H, W) at an output of
    out_size (h, w) pixels, whatever the box's own size: pixel i of the output sits at canvas row
    top + (i + 1/2) (bottom - top) / h, and its cell is the box's extent over h. With out_size equal to the box's
    size these are crop_queries(canvas, box). pad: output pixels of context added on each side (where they still
    lie on the canvas), as render_tiles pads its tiles.

    Returns coords, cells (B, h', w', 2) and the (top, left) offset of the box's first pixel in that grid.
    """
    def axis(n: int, lo: int, hi: int, out: int) -> tuple[Tensor, int]:
        step = (hi - lo) / out
        first = -min(pad, int(lo / step + 1e-9))  # context pixels whose centre stays on the canvas
        last = out + min(pad, int((n - hi) / step + 1e-9))
        idx = torch.arange(first, last, device=device, dtype=torch.float64)
        return (-1 + 2 * (lo + (idx + 0.5) * step) / n).to(dtype), -first

    ys, oy = axis(canvas[0], box[0], box[2], out_size[0])
    xs, ox = axis(canvas[1], box[1], box[3], out_size[1])
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    cell = torch.tensor([2 * (box[2] - box[0]) / (out_size[0] * canvas[0]),
                         2 * (box[3] - box[1]) / (out_size[1] * canvas[1])], device=device, dtype=dtype)
    cells = cell.expand(*coords.shape[:2], 2)
    return coords.expand(batch, *coords.shape), cells.expand(batch, *cells.shape), (oy, ox)
