"""Generate latents with a trained UNet and render them at any resolution.

generate_latents: prompts -> z (B, C, h, w) in the autoencoder's latent units (the scale factor
the UNet was trained with is undone). Rendering is the autoencoder's: phi = D(z) once, then
render_tiles at any size or region.
"""
from __future__ import annotations

import torch
from torch import Tensor

from infd.diffusion.samplers import guided, sample
from infd.diffusion.schedule import FlowSchedule, build_schedule


def unet_fn(unet, schedule):
    """The UNet as model_fn(x, t, context): flow times in [0, 1] are embedded as t * 1000."""
    flow = isinstance(schedule, FlowSchedule)

    def fn(x: Tensor, t: Tensor, cond) -> Tensor:
        """cond: text tokens (B, L, D), or {"context": tokens or None, "labels": (B,) or None}."""
        cond = cond if isinstance(cond, dict) else {"context": cond}
        return unet(x, t * 1000 if flow else t, cond.get("context"), cond.get("labels"))

    return fn


@torch.no_grad()
def generate_latents(unet, diffusion_cfg, latent_scale: float, shape: tuple, prompts: list[str] | None = None,
                     text_encoder=None, cfg_scale: float = 1.0, sampler: str = "ddim", steps: int = 50,
                     seed: int | list[int] = 0, device=None, progress: bool = False, labels: Tensor | None = None,
                     eta: float = 0.0, spacing: str = "linspace") -> Tensor:
    """shape (B, C, h, w). With a text encoder, prompts (B strings) condition the UNet; with a
    class-conditional UNet, labels (B,). cfg_scale > 1 guides away from the empty prompt and the
    "no label" class. eta and spacing are ddim's (spacing also ddpm's), see samplers.sample.
    seed: one for the batch, or B (one per sample: sample i is then the same in any batch); the
    initial noise is samplers.randn(shape, generator(s) seeded with it, device).

    unet: our UNet or a DiffusersUNet (Stable Diffusion's UNet2DConditionModel, from
    models.unet.build_unet), both called as unet(x, t, context, labels). diffusion_cfg's schedule
    keys (beta_schedule, steps_offset, set_alpha_to_one) are honoured; for SD take them and
    latent_scale from convert.stable_diffusion.read_sd_settings(folder)["diffusion"] (and its
    "spacing"): with the folder's text encoder (text kind hf_clip), DDIM then matches diffusers'
    StableDiffusionPipeline with a DDIMScheduler and the same initial noise as `latents`, whose
    output_type="latent" result is this z times latent_scale."""
    schedule = build_schedule(diffusion_cfg)
    cond = uncond = None
    if text_encoder is not None:
        prompts = prompts or [""] * shape[0]
        cond = {"context": text_encoder(prompts)}
        uncond = {"context": text_encoder([""] * len(prompts))}
    if labels is not None:
        null = torch.full_like(labels, unet.cfg.num_classes)
        cond, uncond = (cond or {}) | {"labels": labels}, (uncond or {}) | {"labels": null}
    uncond = uncond if cfg_scale != 1.0 else None
    fn = guided(unet_fn(unet, schedule), cond, uncond, cfg_scale)
    def make(s: int) -> torch.Generator:
        return torch.Generator(device=device or "cpu").manual_seed(s)

    if isinstance(seed, (list, tuple)) and len(seed) != shape[0]:
        raise ValueError(f"{len(seed)} seeds for a batch of {shape[0]}")
    generator = [make(s) for s in seed] if isinstance(seed, (list, tuple)) else make(seed)
    z = sample(fn, schedule, shape, sampler, steps, generator=generator, device=device, eta=eta, progress=progress,
               spacing=spacing)
    return z / latent_scale
