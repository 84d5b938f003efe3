"""One optimisation step of stage 1: generator (E, bottleneck, D, renderer) then discriminator.

The discriminator step reuses the generator's rendered output (detached), so the autoencoder
runs once per step. The adaptive GAN weight uses gradients averaged over ranks.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from infd.losses import Stage1Loss
from infd.render import render_tiles
from train.data import to_device
from train.dist import DistInfo, all_reduce_mean


@contextmanager
def frozen(module: torch.nn.Module):
    """No parameter gradients (and so no ZeRO gradient hooks) for `module` inside the block."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class Stage1Step:
    def __init__(self, gen, disc, loss: Stage1Loss, info: DistInfo, ema=None):
        self.gen, self.disc, self.loss, self.info, self.ema = gen, disc, loss, info, ema

    def __call__(self, micro_batches: list[dict], step: int) -> dict:
        """One optimizer step over the micro-batches (gradient accumulation). Returns mean logs."""
        totals: dict[str, float] = {}
        for batch in micro_batches:
            logs = self._micro_step(to_device(batch, self.info.device), step)
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if self.ema is not None:
            self.ema.update(self.gen.module)
        return totals

    def _micro_step(self, b: dict, step: int) -> dict:
        out = self.gen(b["enc"], b["coords"], b["cells"])
        renderer = self.gen.module.renderer
        with frozen(self.disc.module):
            # The discriminator module itself, not its engine: no engine hook sees this graph.
            loss_g, grad_rgb, logs = self.loss.generator_objective(
                out.rgb, b["gt"], out.bottleneck.loss, step, disc=self.disc.module,
                head_weight_grad=lambda g: renderer.head_weight_grad(out.head_input, g), reduce_grad=all_reduce_mean)
        surrogate = (out.rgb * grad_rgb).sum() + self.loss.cfg.bottleneck_weight * out.bottleneck.loss
        self.gen.backward(surrogate)
        self.gen.step()
        if self.loss.gan_active(step):
            fake = out.rgb.detach()
            loss_d, dlogs = self.loss.discriminator_loss(self.disc(b["gt"]), self.disc(fake))
            self.disc.backward(loss_d)
            self.disc.step()
            logs.update(dlogs)
        logs.update({f"bottleneck/{k.split('/')[-1]}": v for k, v in out.bottleneck.stats.items()})
        # Every rank saw its own shard of the batch: report global means (equal to a 1-process run),
        # in one all-reduce rather than one per scalar.
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], device=self.info.device, dtype=torch.float32) for k in keys])
        return dict(zip(keys, all_reduce_mean(values).tolist()))


@torch.no_grad()
def image_panels(model, batch: dict, device, n: int = 2) -> dict:
    """Input, reconstructions rendered at 256, 512 and 1024, and a zoomed crop of a 4096 render."""
    was_training = model.training
    model.eval()
    x = to_device(batch, device)["enc"][:n]
    phi = model.decode(model.encode(x))
    panels = {"images/input": x.cpu()}
    for size in (256, 512, 1024):
        panels[f"images/recon_{size}"] = render_tiles(model.renderer, phi, (size, size))
    panels["images/zoom_4096_center_256"] = render_tiles(model.renderer, phi, (4096, 4096),
                                                         region=(1920, 1920, 2176, 2176))
    model.train(was_training)
    return panels
