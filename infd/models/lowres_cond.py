"""Low-resolution conditioning of a UNet (super-resolution, issue 28): the low-resolution image's latent is
concatenated to the noisy latent as extra input channels, and the level of the noise added to it (noise
augmentation) enters through an embedding added to the time embedding.

Both start at zero: the extra input channels' weights of the first convolution and the level embedding's
last layer are zero-initialised, so a pretrained UNet given these inputs computes exactly what it did
without them, and training grows the condition's influence from there.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from infd.models.blocks import timestep_embedding


def widen_conv_in(conv: nn.Conv2d, extra: int) -> nn.Conv2d:
    """A copy of `conv` taking `extra` more input channels (appended), their weights zero."""
    wide = nn.Conv2d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    if conv.weight.is_meta:
        return wide
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide


def widen_weight(weight: Tensor, in_channels: int) -> Tensor:
    """A pretrained first-convolution weight (O, I, k, k) padded with zero input channels to in_channels."""
    out = weight.new_zeros(weight.shape[0], in_channels, *weight.shape[2:])
    out[:, :weight.shape[1]] = weight
    return out


class LevelEmbedding(nn.Module):
    """The noise-augmentation level (B,) in [0, 1] -> (B, emb_dim), zero at initialisation."""

    def __init__(self, ch: int, emb_dim: int):
        super().__init__()
        self.ch = ch
        self.mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, level: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(level * 1000, self.ch).to(self.mlp[0].weight.dtype))


def check_lowres(lowres: Tensor | None, x: Tensor, channels: int) -> Tensor:
    """The condition of a super-resolution UNet, checked against the noisy latent x (B, C, h, w)."""
    if lowres is None:
        raise ValueError(f"a super-resolution UNet (lowres_channels {channels}) needs the low-resolution latent "
                         "(lowres) as its condition")
    if lowres.shape[0] != x.shape[0] or lowres.shape[1] != channels or lowres.shape[2:] != x.shape[2:]:
        raise ValueError(f"lowres {tuple(lowres.shape)}: expected ({x.shape[0]}, {channels}, {x.shape[2]}, "
                         f"{x.shape[3]}), on the noisy latent's grid")
    return lowres.to(x.dtype)

