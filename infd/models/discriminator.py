"""PatchGAN discriminator (pix2pix NLayerDiscriminator): one logit per overlapping patch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from infd.models.blocks import group_norm


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "group"] = "batch"  # batch = paper; group avoids cross-rank BN statistics


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else group_norm(channels)


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

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as in pix2pix and taming-transformers.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
