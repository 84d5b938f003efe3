"""Differentiable renders of one box of the canvas at any output size (guided sampling, `infd solve`).

A condition on a box needs only that box, at the resolution the condition asks for: the box's pixels are
queried at their own coordinates and cells (infd.geometry.box_queries), so a 224 x 224 render of a box of a
4096 x 4096 canvas costs what a 224 x 224 canvas costs. phi = D(z) is decoded once per z and shared by every
box; gradients reach z through the renderer, the decoder and (VQ) the quantiser's straight-through path.

Like render_tiles, a box is rendered with `receptive_radius` pixels of context on each side (where they lie on
the canvas); with `tile_rows` the output is rendered in strips of that many rows, each checkpointed
(recomputed in the backward pass), so the renderer's activations are held for one strip at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infd.geometry import box_queries
from infd.render import Box


def check_box(canvas: tuple[int, int], box: Box, what: str = "box") -> None:
    top, left, bottom, right = box
    if not (0 <= top < bottom <= canvas[0] and 0 <= left < right <= canvas[1]):
        raise ValueError(f"{what} (top, left, bottom, right) = {tuple(box)} lies outside the canvas of (H, W) = "
                         f"{tuple(canvas)} or is empty: boxes are pixels of the canvas, 0 <= top < bottom <= H and "
                         "0 <= left < right <= W")


def render_box(renderer: nn.Module, phi: Tensor, canvas: tuple[int, int], box: Box, out_size: tuple[int, int],
               tile_rows: int | None = None) -> Tensor:
    """phi (B, C, h, w) -> the box rendered at out_size (B, 3, oh, ow), differentiable in phi."""
    check_box(canvas, box)
    pad = getattr(renderer, "receptive_radius", 0)
    coords, cells, (oy, ox) = box_queries(canvas, box, out_size, phi.shape[0], phi.device, phi.dtype, pad)
    if tile_rows is None or tile_rows >= out_size[0]:
        return renderer(phi, coords, cells)[:, :, oy:oy + out_size[0], ox:ox + out_size[1]]
    strips = []
    for r0 in range(0, out_size[0], tile_rows):
        r1 = min(r0 + tile_rows, out_size[0])
        lo, hi = max(oy + r0 - pad, 0), min(oy + r1 + pad, coords.shape[1])
        rgb = checkpoint(renderer, phi, coords[:, lo:hi], cells[:, lo:hi], use_reentrant=False)
        strips.append(rgb[:, :, oy + r0 - lo:oy + r1 - lo, ox:ox + out_size[1]])
    return torch.cat(strips, dim=2)
