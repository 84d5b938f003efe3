"""Pieces of benchmarks/train_step.py: the official code's stage-1 step structure built from our
modules, and a batch of the stage-1 loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from infd.losses import Stage1Loss, adaptive_gan_weight, hinge_d_loss
from infd.models import NeuralFieldAutoencoder
from infd.models.discriminator import PatchDiscriminator
from infd.utils.mfu import Phases, count_flops


@dataclass
class Row:
    step: object  # step(i) -> None
    flops: int
    phases: Phases | None = None


class OfficialStage1:
    """yinboc/infd's stage-1 step as its trainer structures it: fp32, no autocast; one Adam per
    part (encoder with the bottleneck, decoder, renderer; the discriminator's own); the generator
    loss with the adaptive weight from autograd.grad of both terms at the renderer's last layer
    (retaining the graph), one backward; then the discriminator step on a second forward of the
    whole autoencoder under no_grad (the official code does not reuse the generator's output)."""

    def __init__(self, cfg, device: torch.device):
        torch.manual_seed(cfg.trainer.seed)
        self.cfg, self.device = cfg, device
        self.model = NeuralFieldAutoencoder(cfg.model).to(device)
        self.disc = PatchDiscriminator(cfg.disc).to(device)
        self.loss = Stage1Loss(cfg.loss).to(device)
        m = self.model
        parts = [[*m.encoder.parameters(), *m.bottleneck.parameters()], m.decoder.parameters(),
                 m.renderer.parameters()]
        self.gen_opts = [self._adam(p, cfg.optim) for p in parts]
        self.disc_opt = self._adam(self.disc.parameters(), cfg.disc_optim)
        self.phases = Phases(device, enabled=True)

    @staticmethod
    def _adam(params, optim):
        return torch.optim.Adam(params, lr=optim.lr, betas=tuple(optim.betas))

    def step(self, batch) -> None:
        b, phase, lc = batch, self.phases, self.loss.cfg
        with phase("forward"):
            out = self.model(b.enc, b.coords, b.cells)
        with phase("loss"):
            rec, _ = self.loss.reconstruction_loss(out.rgb, b.gt)
            gan = -self.disc(out.rgb).mean()
            weight = adaptive_gan_weight(rec, gan, self.model.last_layer, lc.adaptive_max)
            total = rec + lc.bottleneck_weight * out.bottleneck.loss + lc.gan_weight * weight * gan
        with phase("backward"):
            for opt in self.gen_opts:
                opt.zero_grad(set_to_none=True)
            total.backward()
        with phase("optimizer"):
            for opt in self.gen_opts:
                opt.step()
        with phase("discriminator"):
            with torch.no_grad():
                fake = self.model(b.enc, b.coords, b.cells).rgb  # the second forward
            self.disc_opt.zero_grad(set_to_none=True)
            hinge_d_loss(self.disc(b.gt), self.disc(fake)).backward()
            self.disc_opt.step()


def official_stage1(cfg, batch, device: torch.device) -> Row:
    official = OfficialStage1(cfg, device)
    flops = count_flops(lambda: official.step(batch))
    official.phases.reset()
    return Row(lambda i: official.step(batch), flops, official.phases)


def stage1_batch(cfg, device: torch.device):
    """The first batch of the stage-1 loader of `cfg` (synthetic images), on the device."""
    from train.autoencoder import build_data
    from train.dist import DistInfo

    loader = build_data(cfg, DistInfo(0, 0, 1, device))
    return next(iter(loader)).to(device)
