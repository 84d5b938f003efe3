"""LDM-style convolutional encoder and decoder (VQ-f4 in the paper configuration)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from infd.config import ConfigError
from infd.models.blocks import AttnBlock, Downsample, MidBlock, ResBlock, Upsample, group_norm


@dataclass
class ConvNetConfig:
    """Shared shape of encoder and decoder. Downsampling factor is 2 ** (len(ch_mult) - 1)."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = field(default_factory=tuple)  # feature sizes with attention
    z_channels: int = 3
    resolution: int = 256  # encoder input size; fixes where attn_resolutions apply
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups everywhere (LDM: 32; diffusers: norm_num_groups)

    def validate(self, prefix: str = "") -> None:
        if not self.ch_mult:
            raise ConfigError(f"config key '{prefix}ch_mult' must not be empty")
        if self.norm_groups < 1:
            raise ConfigError(f"config key '{prefix}norm_groups' must be >= 1, got {self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> features (B, out_channels, H/f, W/f)."""

    def __init__(self, cfg: ConvNetConfig, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        layers, ch, res = [], cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, cfg.ch * mult, cfg.dropout, cfg.norm_groups))
                ch = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(ch, cfg.norm_groups))
            if level != len(cfg.ch_mult) - 1:
                layers.append(Downsample(ch))
                res //= 2
        self.down = nn.Sequential(*layers)
        self.mid = MidBlock(ch, cfg.dropout, cfg.norm_groups)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> feature map phi (B, ch * ch_mult[0], h*f, w*f).

    The LDM decoder without its final norm and RGB conv: the renderer turns phi into pixels.
    """

    def __init__(self, cfg: ConvNetConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, cfg.dropout, cfg.norm_groups)
        layers = []
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(ch, cfg.ch * cfg.ch_mult[level], cfg.dropout, cfg.norm_groups))
                ch = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(ch, cfg.norm_groups))
            if level != 0:
                layers.append(Upsample(ch))
                res *= 2
        self.up = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, z: Tensor) -> Tensor:
        return self.up(self.mid(self.conv_in(z)))
