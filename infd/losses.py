"""Stage-1 losses: L1 + LPIPS + adaptive-weight hinge GAN + bottleneck term
(docs/design.md, reference configuration)."""
from __future__ import annotations

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


RANDOM_LPIPS_SEED = 0


def build_lpips(backbone: str = "pretrained") -> nn.Module:
    """LPIPS (VGG) with its calibrated linear heads (infd/lpips.py).

    backbone: "pretrained" loads torchvision's ImageNet VGG16 from the torch hub cache;
    a path loads those weights from a file; "random" keeps a random-init VGG, for offline
    tests only: such a network gives no meaningful perceptual distance and is named so. Its weights come
    from a fixed seed, not the global random state: the same network on every rank and in every process.
    """
    from infd.lpips import LPIPS

    if backbone == "pretrained" and not VGG16_CACHE.exists():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 weights at {VGG16_CACHE} (no download here). Copy "
            "vgg16-397923af.pth there, give its path as lpips_backbone, or use lpips_backbone=random "
            "for tests (random-init LPIPS).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_LPIPS_SEED)
        net = LPIPS(is_random_init=backbone == "random")
    if backbone != "random":
        path = VGG16_CACHE if backbone == "pretrained" else backbone
        net.load_vgg16(torch.load(path, map_location="cpu", weights_only=True))
    return net


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float,
                        reduce_grad=None) -> Tensor:
    """lambda = |grad rec| / |grad gan| at the last layer, clamped to [0, max_weight], no gradient.

    The direct definition (a second backward through the graph); Stage1Loss computes the same
    number from d loss / d rgb and the output layer's input. reduce_grad averages a gradient over
    data-parallel ranks, so lambda is the global batch's rather than a per-rank estimate.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if reduce_grad is not None:
        g_rec, g_gan = reduce_grad(g_rec), reduce_grad(g_gan)
    return adaptive_weight_from_norms(g_rec.norm(), g_gan.norm(), max_weight)


def adaptive_weight_from_norms(rec_norm: Tensor, gan_norm: Tensor, max_weight: float) -> Tensor:
    return (rec_norm / (gan_norm + 1e-4)).clamp(0.0, max_weight).detach()


class Stage1Loss(nn.Module):
    """Generator and discriminator objectives of stage 1.

    generator_objective(...) -> (loss, d loss / d rgb, logs)
    discriminator_loss(logits_real, logits_fake) -> (loss, logs); the caller runs the
    discriminator on the generator's (detached) output, so the autoencoder runs once per step.
    """

    def __init__(self, cfg: Stage1LossConfig, lpips_net: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.lpips = None
        if cfg.lpips_weight > 0:  # weight 0 (e.g. a CPU demo): VGG is neither built nor run
            self.lpips = lpips_net if lpips_net is not None else build_lpips(cfg.lpips_backbone)
        self.lpips_name = "lpips_randinit" if getattr(self.lpips, "is_random_init", False) else "lpips"

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start

    def reconstruction_loss(self, pred: Tensor, target: Tensor):
        """pred, target (B, 3, H, W) in [-1, 1] -> (scalar, logs)."""
        l1 = (pred - target).abs().mean()
        if self.lpips is None:
            return self.cfg.l1_weight * l1, {"l1": l1.detach()}
        perceptual = self.lpips(pred.float(), target.float()).float().mean()  # VGG may run in bf16; the mean not
        loss = self.cfg.l1_weight * l1 + self.cfg.lpips_weight * perceptual
        return loss, {"l1": l1.detach(), self.lpips_name: perceptual.detach()}

    def generator_objective(self, rgb: Tensor, target: Tensor, bottleneck_loss: Tensor, step: int,
                            disc: nn.Module | None = None, head_weight_grad=None, reduce_grad=None):
        """The generator loss, evaluated on a detached copy of the rendered rgb.

        rgb (B, 3, H, W): the renderer's output (its graph is not touched).
        disc: the discriminator module, called with its parameters frozen by the caller.
        head_weight_grad(grad_rgb) -> d/dW of the renderer's output layer, from d loss / d rgb;
        with it the adaptive weight is |grad_W rec| / |grad_W gan| as in the paper, computed
        without a second backward through the model (so it works inside DeepSpeed engines).
        reduce_grad averages over data-parallel ranks, so lambda is the global batch's.
        Returns (loss, grad_rgb, logs): backpropagate `(rgb * grad_rgb).sum() + bottleneck term`
        through the model for exactly the gradient of `loss`.
        """
        leaf = rgb.detach().requires_grad_(True)
        rec, logs = self.reconstruction_loss(leaf, target)
        grad_rec = torch.autograd.grad(rec, leaf)[0]
        grad, loss = grad_rec, rec.detach() + self.cfg.bottleneck_weight * bottleneck_loss.detach()
        if disc is not None and self.gan_active(step):
            gan = -disc(leaf).float().mean()
            grad_gan = torch.autograd.grad(gan, leaf)[0]
            g_rec, g_gan = head_weight_grad(grad_rec), head_weight_grad(grad_gan)
            if reduce_grad is not None:
                g_rec, g_gan = reduce_grad(g_rec), reduce_grad(g_gan)
            weight = adaptive_weight_from_norms(g_rec.norm(), g_gan.norm(), self.cfg.adaptive_max)
            grad = grad_rec + self.cfg.gan_weight * weight * grad_gan
            loss = loss + self.cfg.gan_weight * weight * gan.detach()
            logs.update({"gan_g": gan.detach(), "adaptive_weight": weight})
        logs.update({"bottleneck": bottleneck_loss.detach(), "loss_g": loss})
        return loss, grad, logs

    def discriminator_loss(self, logits_real: Tensor, logits_fake: Tensor):
        logits_real, logits_fake = logits_real.float(), logits_fake.float()  # reduced in fp32 (bf16 autocast)
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"loss_d": loss.detach(), "logits_real": logits_real.mean().detach(),
                      "logits_fake": logits_fake.mean().detach()}
