"""ADM-style UNet for latent diffusion (Dhariwal & Nichol 2021; LDM), with optional class labels
and cross-attention to text tokens. Paper configuration: 224 channels, mult (1, 2, 3, 4), 2 res
blocks per level, self-attention at downsample factors 2, 4, 8 with 32 channels per head.

forward(x (B, C, h, w), t (B,), context (B, L, D) or None, labels (B,) or None) -> (B, C, h, w)

infd.models.build_unet(cfg) builds this UNet (kind "infd") or diffusers' UNet2DConditionModel behind
the same call (kind "diffusers": a Stable Diffusion UNet, see infd.models.diffusers_unet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infd.config import ConfigError
from infd.models.blocks import Downsample, Upsample, group_norm, timestep_embedding
from infd.models.lowres_cond import LevelEmbedding, check_lowres, widen_conv_in


@dataclass
class UNetConfig:
    in_channels: int = 3
    ch: int = 224
    ch_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attn_ds: tuple[int, ...] = (2, 4, 8)  # downsample factors with attention
    head_channels: int = 32
    dropout: float = 0.0
    context_dim: int = 0  # text token width for cross-attention; 0 = none
    num_classes: int = 0  # class labels (index num_classes = "no label" for guidance); 0 = none
    grad_checkpointing: bool = False
    # super-resolution: channels of the low-resolution image's latent concatenated to x, and a noise-level
    # embedding (infd/models/lowres_cond.py), both zero at initialisation; 0: none
    lowres_channels: int = 0
    # "diffusers": diffusers' UNet2DConditionModel (Stable Diffusion); the keys above except
    # grad_checkpointing then do not apply, and in_channels / context_dim are filled from
    # diffusers_config (in_channels, cross_attention_dim).
    kind: Literal["infd", "diffusers"] = "infd"
    pretrained: str = ""  # kind diffusers: an SD diffusers folder with unet/, or that unet/ folder
    # kind diffusers: the UNet2DConditionModel config (unet/config.json); read from `pretrained`
    # when empty. Exports record it, so an export rebuilds without the source folder.
    diffusers_config: dict = field(default_factory=dict)

    def validate(self, prefix: str = "") -> None:
        if not isinstance(self.diffusers_config, dict):
            raise ConfigError(f"config key '{prefix}diffusers_config' must be a mapping, got {self.diffusers_config!r}")
        if self.kind == "diffusers":
            if not (self.pretrained or self.diffusers_config):
                raise ConfigError(f"config key '{prefix}pretrained': unet kind 'diffusers' needs a diffusers "
                                  f"folder (or '{prefix}diffusers_config')")
            if self.num_classes:
                raise ConfigError(f"config key '{prefix}num_classes' = {self.num_classes}: a diffusers "
                                  "UNet2DConditionModel takes no class labels here; use 0")
            return
        for mult in self.ch_mult:
            if (self.ch * mult) % self.head_channels:
                raise ConfigError(f"config key '{prefix}head_channels' = {self.head_channels} must divide every "
                                  f"level width (ch * ch_mult: {self.ch * mult})")


class TimeResBlock(nn.Module):
    """ResBlock whose second norm is scaled and shifted by the time embedding (ADM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[..., None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, C) over keys/values from `source` (B, M, Cs)."""

    def __init__(self, channels: int, heads: int, source_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(source_dim or channels, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, source: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, source.shape[1], self.heads, -1).transpose(1, 2) for t in self.kv(source).chunk(2, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class SpatialAttention(nn.Module):
    """Self-attention over positions, then cross-attention to text tokens when given. (B, C, h, w)."""

    def __init__(self, channels: int, head_channels: int, context_dim: int):
        super().__init__()
        heads = channels // head_channels
        self.norm1, self.self_attn = nn.LayerNorm(channels), Attention(channels, heads)
        self.cross = None
        if context_dim:
            self.norm2, self.cross = nn.LayerNorm(channels), Attention(channels, heads, context_dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm1(tokens)
        tokens = tokens + self.self_attn(normed, normed)
        if self.cross is not None and context is not None:
            tokens = tokens + self.cross(self.norm2(tokens), context)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        emb_dim = 4 * cfg.ch
        self.time_mlp = nn.Sequential(nn.Linear(cfg.ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.level_emb = None
        if cfg.lowres_channels:
            self.conv_in = widen_conv_in(self.conv_in, cfg.lowres_channels)
            self.level_emb = LevelEmbedding(cfg.ch, emb_dim)
        self.down, skips, ch, ds = nn.ModuleList(), [cfg.ch], cfg.ch, 1
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._stage(ch, cfg.ch * mult, ds, emb_dim))
                ch = cfg.ch * mult
                skips.append(ch)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([TimeResBlock(ch, ch, emb_dim, cfg.dropout),
                                  SpatialAttention(ch, cfg.head_channels, cfg.context_dim),
                                  TimeResBlock(ch, ch, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for i in range(cfg.num_res_blocks + 1):
                self.up.append(self._stage(ch + skips.pop(), cfg.ch * mult, ds, emb_dim))
                ch = cfg.ch * mult
                if level and i == cfg.num_res_blocks:
                    self.up.append(Upsample(ch))
                    ds //= 2
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _stage(self, in_ch: int, out_ch: int, ds: int, emb_dim: int) -> nn.ModuleList:
        layers = [TimeResBlock(in_ch, out_ch, emb_dim, self.cfg.dropout)]
        if ds in self.cfg.attn_ds:
            layers.append(SpatialAttention(out_ch, self.cfg.head_channels, self.cfg.context_dim))
        return nn.ModuleList(layers)

    def _run(self, layer: nn.Module, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        if isinstance(layer, nn.ModuleList):
            for sub in layer:
                h = self._run(sub, h, emb, context)
            return h
        if isinstance(layer, (Downsample, Upsample)):
            return layer(h)
        args = (h, emb) if isinstance(layer, TimeResBlock) else (h, context)
        if self.cfg.grad_checkpointing and self.training:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, labels: Tensor | None = None,
                lowres: Tensor | None = None, level: Tensor | None = None) -> Tensor:
        """x (B, C, h, w), t (B,); context (B, L, D) text tokens; labels (B,); lowres (B, lowres_channels, h, w)
        and level (B,) in [0, 1]: a super-resolution UNet's condition and its noise level (default 0)."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.ch))
        if self.label_emb is not None:
            labels = labels if labels is not None else torch.full_like(t, self.cfg.num_classes, dtype=torch.long)
            emb = emb + self.label_emb(labels)
        if self.level_emb is not None:
            x = torch.cat([x, check_lowres(lowres, x, self.cfg.lowres_channels)], dim=1)
            emb = emb + self.level_emb(level if level is not None else torch.zeros_like(t, dtype=torch.float32))
        elif lowres is not None:
            raise ValueError("this UNet takes no low-resolution condition (unet.lowres_channels is 0)")
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context)
            skips.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb, context)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
                continue
            h = self._run(layer, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.conv_out(F.silu(self.norm_out(h)))
