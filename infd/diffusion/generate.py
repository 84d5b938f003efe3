"""Generate latents with a trained UNet; rendering them at any resolution is the autoencoder's.

generate_latents: conditioning -> z (B, C, h, w) in the autoencoder's latent units (the scale
factor the UNet was trained with is undone). Then phi = D(z) once, and render_tiles at any size
or region.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from infd.diffusion.samplers import guided, randn, sample
from infd.diffusion.schedule import DiffusionConfig, FlowSchedule, build_schedule
from infd.diffusion.spec import Conditioning, SamplingSpec


@dataclass
class LatentDiffusion:
    """A UNet with what sampling from it needs: its schedule (with the latent scale it trained
    with) and its text encoder (None: not text-conditioned). A UNet export's record carries both;
    a training run builds one from its task.

    unet: our UNet or a DiffusersUNet (Stable Diffusion's UNet2DConditionModel, from
    infd.models.build_unet), both called as unet(x, t, context, labels).
    diffusion: the schedule keys (beta_schedule, steps_offset, set_alpha_to_one) are honoured;
    z was multiplied by diffusion.latent_scale before diffusion (a number here, never "auto").
    """

    unet: nn.Module
    diffusion: DiffusionConfig
    text: nn.Module | None = None

    @property
    def latent_scale(self) -> float:
        if self.diffusion.latent_scale == "auto":
            raise ValueError("LatentDiffusion needs the number the UNet trained with, not latent_scale 'auto'")
        return float(self.diffusion.latent_scale)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def unet_fn(unet, schedule):
    """The UNet as model_fn(x, t, context): flow times in [0, 1] are embedded as t * 1000."""
    flow = isinstance(schedule, FlowSchedule)

    def fn(x: Tensor, t: Tensor, cond) -> Tensor:
        """cond: text tokens (B, L, D), or {"context": tokens or None, "labels": (B,) or None, and for a
        super-resolution UNet "lowres": (B, C, h, w), "level": (B,)}."""
        cond = cond if isinstance(cond, dict) else {"context": cond}
        extra = {k: cond[k] for k in ("lowres", "level") if cond.get(k) is not None}
        return unet(x, t * 1000 if flow else t, cond.get("context"), cond.get("labels"), **extra)

    return fn


def _branches(model: LatentDiffusion, cond: Conditioning, batch: int) -> tuple[dict | None, dict | None]:
    """The UNet's conditional and unconditional inputs: the prompts' tokens against the empty
    prompt's, the labels against the "no label" class (num_classes)."""
    c = u = None
    if model.text is not None:
        prompts = cond.prompts or [""] * batch
        c, u = {"context": model.text(prompts)}, {"context": model.text([""] * len(prompts))}
    if cond.labels is not None:
        null = torch.full_like(cond.labels, model.unet.cfg.num_classes)
        c, u = (c or {}) | {"labels": cond.labels}, (u or {}) | {"labels": null}
    if cond.lowres is not None:  # not dropped for guidance: both branches see the image
        low = {"lowres": cond.lowres * model.latent_scale, "level": cond.lowres.new_zeros(cond.lowres.shape[0])}
        c, u = (c or {}) | low, (u or {}) | low
    return c, u


@torch.no_grad()
def generate_latents(model: LatentDiffusion, spec: SamplingSpec, cond: Conditioning, shape: tuple,
                     seeds: int | list[int], progress: bool = False) -> Tensor:
    """shape (B, C, h, w) -> z of that shape in the autoencoder's units. spec.cfg_scale > 1 guides
    away from the empty prompt and the "no label" class. seeds: one for the batch, or B (one per
    sample: sample i is then the same in any batch); the initial noise is samplers.randn(shape,
    generator(s) seeded with it, model.device).

    For Stable Diffusion take the schedule and latent_scale from
    convert.stable_diffusion.read_sd_settings(folder)["diffusion"] (and its "spacing"): with the
    folder's text encoder (text kind hf_clip), DDIM then matches diffusers'
    StableDiffusionPipeline with a DDIMScheduler and the same initial noise as `latents`, whose
    output_type="latent" result is this z times latent_scale."""
    schedule = build_schedule(model.diffusion)
    c, u = _branches(model, cond, shape[0])
    fn = guided(unet_fn(model.unet, schedule), c, u if spec.cfg_scale != 1.0 else None, spec.cfg_scale)
    device = model.device

    def make(s: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(s)

    if isinstance(seeds, (list, tuple)) and len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    generator = [make(s) for s in seeds] if isinstance(seeds, (list, tuple)) else make(seeds)
    if cond.guide is not None:
        return _guided(model, spec, cond.guide, fn, schedule, randn(shape, generator, device), generator, progress)
    z = sample(fn, schedule, shape, spec.sampler, spec.steps, generator=generator, device=device, eta=spec.eta,
               progress=progress, spacing=spec.spacing)
    return z / model.latent_scale


def _guided(model: LatentDiffusion, spec: SamplingSpec, guide, fn, schedule, noise: Tensor, generator,
            progress: bool) -> Tensor:
    """Diffusion posterior sampling towards the conditions of `guide` (infd/solve/dps.py)."""
    from infd.solve.dps import dps

    if spec.sampler not in ("ddim", "ddpm") or isinstance(schedule, FlowSchedule):
        raise ValueError(f"guided sampling runs ddim or ddpm steps on an epsilon/v UNet, not {spec.sampler!r}")
    scale = model.latent_scale
    eta = 1.0 if spec.sampler == "ddpm" else spec.eta
    z = dps(fn, schedule, noise, spec.steps, lambda x0: guide(x0 / scale), spec.guide_scale, spec.guide_grad,
            eta=eta, generator=generator, progress=progress, spacing=spec.spacing)
    return z / scale
