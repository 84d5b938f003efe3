"""Renderers: turn a feature map phi and query coordinates into RGB, at any resolution.

All renderers share `forward(phi, coords, cells)`:
  phi (B, C, h, w); coords, cells (B, H, W, 2) -> rgb (B, 3, H, W)
and expose `receptive_radius`, the number of output pixels beyond a query that can change its
value; tiled rendering pads tiles by at least that much.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infd.config import ConfigError
from infd.geometry import query_nearest
from infd.utils.precision import full_precision


@dataclass
class RendererConfig:
    kind: Literal["clif", "liif"] = "clif"
    hidden: int = 256  # clif: conv width
    n_blocks: int = 2  # clif: residual blocks
    norm: Literal["group", "pixel"] = "group"  # clif: group = paper; pixel = strictly local
    mlp_hidden: tuple[int, ...] = (256, 256, 256, 256)  # liif
    feat_unfold: bool = True  # liif: 3x3 neighbourhood of phi per query
    local_ensemble: bool = True  # liif: area-weighted blend of the 4 nearest features

    def validate(self, prefix: str = "") -> None:
        if self.kind == "clif" and self.norm == "group" and self.hidden % 32:
            raise ConfigError(f"config key '{prefix}hidden' = {self.hidden} must be a multiple of 32 "
                              "with norm=group (GroupNorm 32), or set norm=pixel")


class PixelNorm(nn.Module):
    """LayerNorm over channels at each pixel, with affine: no statistic crosses pixels."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(32, channels, eps=1e-6) if kind == "group" else PixelNorm(channels)


class RendererBlock(nn.Module):
    """norm-SiLU-conv3x3 twice with identity skip. (B, C, H, W) -> same."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.norm1, self.norm2 = _norm(norm, channels), _norm(norm, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class CLIF(nn.Module):
    """Convolutional local image function (the paper's renderer).

    Per query: nearest phi vector + relative coordinate + relative cell (C + 4 channels), then a
    small conv net over the query grid. With norm=group its GroupNorm statistics span the rendered
    grid, so a render depends on the grid it is part of; norm=pixel makes it strictly local.
    """

    def __init__(self, in_channels: int, cfg: RendererConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels + 4, cfg.hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[RendererBlock(cfg.hidden, cfg.norm) for _ in range(cfg.n_blocks)])
        self.norm_out = _norm(cfg.norm, cfg.hidden)
        self.conv_out = nn.Conv2d(cfg.hidden, 3, 3, padding=1)
        self.receptive_radius = 2 + 2 * cfg.n_blocks  # one pixel per 3x3 conv
        self.is_local = cfg.norm == "pixel"

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, phi: Tensor, coords: Tensor, cells: Tensor) -> Tensor:
        return self.forward_with_head_input(phi, coords, cells)[0]

    def forward_with_head_input(self, phi: Tensor, coords: Tensor, cells: Tensor):
        """-> rgb (B, 3, H, W) and the output layer's input (B, hidden, H, W)."""
        q_feat, rel_coord, rel_cell = query_nearest(phi, coords, cells)
        x = torch.cat([q_feat, rel_coord.to(q_feat.dtype), rel_cell.to(q_feat.dtype)], dim=1)
        head_input = F.silu(self.norm_out(self.blocks(self.conv_in(x))))
        return self.conv_out(head_input), head_input

    def head_weight_grad(self, head_input: Tensor, grad_rgb: Tensor) -> Tensor:
        """Gradient of a loss w.r.t. the output layer's weight, from d loss / d rgb (in fp32: the
        adaptive GAN weight is a ratio of two of their norms)."""
        with full_precision(grad_rgb.device.type):
            return torch.nn.grad.conv2d_weight(head_input.detach().float(), self.conv_out.weight.shape,
                                               grad_rgb.float(), padding=1)


class LIIF(nn.Module):
    """Local implicit image function: a pointwise MLP per query (Chen et al. 2021).

    Options: 3x3 feature unfolding and the 4-neighbour area-weighted local ensemble.
    Pointwise, so strictly local (receptive radius 0).
    """

    def __init__(self, in_channels: int, cfg: RendererConfig):
        super().__init__()
        self.feat_unfold, self.local_ensemble = cfg.feat_unfold, cfg.local_ensemble
        dims = [in_channels * (9 if cfg.feat_unfold else 1) + 4, *cfg.mlp_hidden]
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], 3))
        self.receptive_radius = 0
        self.is_local = True

    @property
    def last_layer(self) -> Tensor:
        return self.mlp[-1].weight

    def forward(self, phi: Tensor, coords: Tensor, cells: Tensor) -> Tensor:
        return self.forward_with_head_input(phi, coords, cells)[0]

    def forward_with_head_input(self, phi: Tensor, coords: Tensor, cells: Tensor):
        """-> rgb (B, 3, H, W) and the output layer's input: per ensemble member the hidden
        features (B, H, W, hidden) and its blend weight (B, 1, H, W)."""
        if self.feat_unfold:
            b, c, h, w = phi.shape
            phi = F.unfold(phi, 3, padding=1).view(b, c * 9, h, w)
        shifts = [(sy, sx) for sy in (-0.5, 0.5) for sx in (-0.5, 0.5)] if self.local_ensemble else [(0.0, 0.0)]
        hidden, areas = [], []
        for shift in shifts:
            q_feat, rel, rel_cell = query_nearest(phi, coords, cells, shift)
            x = torch.cat([q_feat, rel.to(q_feat.dtype), rel_cell.to(q_feat.dtype)], dim=1)
            hidden.append(self.mlp[:-1](x.permute(0, 2, 3, 1)))
            areas.append((rel[:, :1] * rel[:, 1:]).abs() + 1e-9)
        # Local ensemble: each prediction is weighted by the area of the rectangle between the
        # query and the diagonally opposite neighbour's centre, so the blend is continuous.
        weights = [a / sum(areas) for a in reversed(areas)] if self.local_ensemble else [torch.ones_like(areas[0])]
        rgb = sum(self.mlp[-1](h).permute(0, 3, 1, 2) * wt for h, wt in zip(hidden, weights))
        return rgb, (hidden, weights)

    def head_weight_grad(self, head_input, grad_rgb: Tensor) -> Tensor:
        """Gradient of a loss w.r.t. the output layer's weight, from d loss / d rgb."""
        hidden, weights = head_input
        grad = 0
        with full_precision(grad_rgb.device.type):  # fp32, as CLIF's
            for h, wt in zip(hidden, weights):
                g = (grad_rgb.float() * wt.detach().float()).permute(0, 2, 3, 1).reshape(-1, grad_rgb.shape[1])
                grad = grad + g.t() @ h.detach().reshape(-1, h.shape[-1]).float()
        return grad


def build_renderer(cfg: RendererConfig, in_channels: int) -> nn.Module:
    return CLIF(in_channels, cfg) if cfg.kind == "clif" else LIIF(in_channels, cfg)
