"""Stage-1 losses: L1 + LPIPS + adaptive-weight hinge GAN + bottleneck term (DESIGN.md)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infd.config import ConfigError


@dataclass
class Stage1LossConfig:
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_backbone: str = "pretrained"  # "pretrained" (torchvision cache), "random" (offline tests), or a .pth path
    gan_weight: float = 0.75
    adaptive_max: float = 1e4
    bottleneck_weight: float = 1.0  # VQ codebook+commitment; use ~1e-6 for KL
    disc_start: int = 0  # generator GAN term and discriminator updates start at this step
    disc_loss: Literal["hinge"] = "hinge"

    def validate(self, prefix: str = "") -> None:
        if self.lpips_backbone not in ("pretrained", "random") and not self.lpips_backbone.endswith(".pth"):
            raise ConfigError(f"config key '{prefix}lpips_backbone' = {self.lpips_backbone!r}: use "
                              "'pretrained', 'random' or a path to VGG16 weights (.pth)")


VGG16_CACHE = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"


def build_lpips(backbone: str = "pretrained") -> nn.Module:
    """LPIPS (VGG) with its calibrated linear heads (shipped in the lpips package).

    backbone: "pretrained" loads torchvision's ImageNet VGG16 from the torch hub cache;
    a path loads those weights from a file; "random" keeps a random-init VGG, for offline
    tests only: such a network gives no meaningful perceptual distance and is named so.
    """
    import lpips

    if backbone == "pretrained" and not VGG16_CACHE.exists():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 weights at {VGG16_CACHE} (no download here). Copy "
            "vgg16-397923af.pth there, give its path as lpips_backbone, or use lpips_backbone=random "
            "for tests (random-init LPIPS).")
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips's call style
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=backbone != "pretrained", verbose=False)
    if backbone not in ("pretrained", "random"):
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        features = {k.split("features.", 1)[1]: v for k, v in state.items() if k.startswith("features.")}
        _load_vgg_features(net.net, features)
    net.is_random_init = backbone == "random"
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def _load_vgg_features(vgg, features: dict) -> None:
    """lpips splits torchvision's vgg16.features into 5 slices that keep the layer indices."""
    for slice_ in (vgg.slice1, vgg.slice2, vgg.slice3, vgg.slice4, vgg.slice5):
        for name, module in slice_.named_children():
            for pname, _ in module.named_parameters():
                getattr(module, pname).data.copy_(features[f"{name}.{pname}"])


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float) -> Tensor:
    """lambda = |grad rec| / |grad gan| at the last layer, clamped to [0, max_weight], no gradient.

    Under data parallelism each rank uses its local gradients (as the reference code does); the
    trainer may all-reduce the two norms first to use global ones.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return adaptive_weight_from_norms(g_rec.norm(), g_gan.norm(), max_weight)


def adaptive_weight_from_norms(rec_norm: Tensor, gan_norm: Tensor, max_weight: float) -> Tensor:
    return (rec_norm / (gan_norm + 1e-4)).clamp(0.0, max_weight).detach()


class Stage1Loss(nn.Module):
    """Generator and discriminator objectives of stage 1.

    generator_loss(pred, target, bottleneck_loss, logits_fake, last_layer, step) -> (loss, logs)
    discriminator_loss(logits_real, logits_fake) -> (loss, logs)
    The discriminator is run by the caller, so its forward on the generator output is shared.
    """

    def __init__(self, cfg: Stage1LossConfig, lpips_net: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.lpips = lpips_net if lpips_net is not None else build_lpips(cfg.lpips_backbone)
        self.lpips_name = "lpips_randinit" if getattr(self.lpips, "is_random_init", False) else "lpips"

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start

    def reconstruction_loss(self, pred: Tensor, target: Tensor):
        """pred, target (B, 3, H, W) in [-1, 1] -> (scalar, logs)."""
        l1 = (pred - target).abs().mean()
        perceptual = self.lpips(pred.float(), target.float()).mean()
        loss = self.cfg.l1_weight * l1 + self.cfg.lpips_weight * perceptual
        return loss, {"l1": l1.detach(), self.lpips_name: perceptual.detach()}

    def generator_loss(self, pred: Tensor, target: Tensor, bottleneck_loss: Tensor, logits_fake: Tensor | None,
                       last_layer: Tensor | None, step: int):
        rec, logs = self.reconstruction_loss(pred, target)
        loss = rec + self.cfg.bottleneck_weight * bottleneck_loss
        logs["bottleneck"] = bottleneck_loss.detach()
        if logits_fake is not None and self.gan_active(step):
            gan = -logits_fake.mean()
            weight = adaptive_gan_weight(rec, gan, last_layer, self.cfg.adaptive_max) if self.training \
                else torch.zeros((), device=gan.device)
            loss = loss + self.cfg.gan_weight * weight * gan
            logs.update({"gan_g": gan.detach(), "adaptive_weight": weight})
        logs["loss_g"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, logits_real: Tensor, logits_fake: Tensor):
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"loss_d": loss.detach(), "logits_real": logits_real.mean().detach(),
                      "logits_fake": logits_fake.mean().detach()}
