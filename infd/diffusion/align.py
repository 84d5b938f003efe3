"""The alignment loss of super-resolution training (after Kim & Kim, CVPR 2024; issue 28): the clean latent
the UNet predicts is decoded through the frozen decoder and renderer at the GT patch's coordinates (a random
scale and crop, as in stage 1) and compared with the patch, so pixel errors reach the diffusion model.

    L_align = L1(R(D(z0_hat)), gt) + LPIPS(R(D(z0_hat)), gt)     for samples with t <= t_max, else 0

The autoencoder stays frozen (no gradient to its weights); the gradient flows through it to z0_hat and on to
the UNet. Our defaults (weight 0.1, t <= 500 of 1000) are not the paper's, which are not at hand.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from infd.config import ConfigError


@dataclass
class AlignConfig:
    """diffusion.align: off by default."""

    enabled: bool = False
    weight: float = 0.1
    t_max: int = 500  # timesteps t <= t_max (of the schedule's T) get the loss
    lpips: str = "pretrained"  # LPIPS backbone: pretrained | random (offline tests) | PATH | none (L1 alone)

    def validate(self, prefix: str = "") -> None:
        if self.weight < 0 or self.t_max < 0:
            raise ConfigError(f"config keys '{prefix}weight' and '{prefix}t_max' must be >= 0")


def alignment_loss(ae: nn.Module, z0_hat: Tensor, t: Tensor, gt: Tensor, coords: Tensor, cells: Tensor,
                   cfg: AlignConfig, lpips: nn.Module | None) -> Tensor:
    """Mean of the per-sample alignment loss over the samples with t <= t_max (0 when there are none); only
    those samples are decoded and rendered (about half the batch at the defaults).

    z0_hat (B, C, h, w) in the autoencoder's units; gt (B, 3, P, P) in [-1, 1]; coords, cells (B, P, P, 2)."""
    kept = (t <= cfg.t_max).nonzero().flatten().to(z0_hat.device)
    if not len(kept):
        return z0_hat.sum() * 0.0  # keeps the graph (every rank runs the same backward)
    rgb = ae.render(ae.decode(z0_hat[kept]), coords[kept], cells[kept]).float()
    ref = gt[kept].float()
    per = (rgb - ref).abs().flatten(1).mean(1)
    if lpips is not None:
        per = per + lpips(rgb, ref).flatten()
    return per.mean()


def frozen(module: nn.Module) -> nn.Module:
    """module in eval mode with no parameter taking a gradient."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
