"""PatchGAN discriminator (pix2pix NLayerDiscriminator): one logit per overlapping patch.

Norm layers: "sync_batch" (default, as the official run: BatchNorm statistics over the global
batch, via `synchronise_batchnorm`), "batch" (statistics per rank) or "group" (GroupNorm, no
batch statistics). Both batch kinds have the same module structure and state_dict keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from infd.models.blocks import group_norm
from infd.models.sync_batchnorm import synchronise_batchnorm


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    # sync_batch = paper (BN over the global batch); batch = BN per rank; group = GroupNorm
    norm: Literal["sync_batch", "batch", "group"] = "sync_batch"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind not in ("sync_batch", "batch", "group"):
        raise ValueError(f"unknown discriminator norm {kind!r}")
    return group_norm(channels) if kind == "group" else nn.BatchNorm2d(channels)


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) -> patch logits (B, 1, H', W'), H' about H / 2**n_layers - 2."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [nn.Conv2d(cfg.ndf * prev, cfg.ndf * mult, 4, stride, 1, bias=False),
                       _norm(cfg.norm, cfg.ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(cfg.ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)
        if cfg.norm == "sync_batch":
            synchronise_batchnorm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as in pix2pix and taming-transformers.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
