"""How samples are drawn: the one sampling spec and the conditioning of a batch.

`SamplingSpec` is shared by the training panels (the `samples` section extends it), in-training
evaluation, `infd sample`, `infd eval-gen` (whose flags are declared from its fields) and the UNet
export (which records the run's spec as the default of `infd sample`). Its defaults are the only
sampling defaults in the code base.

`Conditioning` is what one batch of samples is conditioned on: prompts, labels, and conditions on boxes
of the canvas at any scale (`guide`, which steers the sample through region renders), with their
sampler-side knobs (guide_scale, guide_grad) in `SamplingSpec`, so `generate_latents` keeps its signature.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from infd.config import ConfigError
from infd.diffusion.samplers import SAMPLERS, SPACINGS, check_options, vp_timesteps

FLOW_SAMPLERS = ("euler", "heun")


@dataclass(frozen=True)
class SamplingSpec:
    """The sampler and its options (see infd.diffusion.samplers.sample) and the guidance scale."""

    sampler: str = "ddim"  # ddpm | ddim | dpmpp (epsilon / v objectives); euler | heun (rectified flow)
    steps: int = 50
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 the paper's (DDPM-like) sampling; ddim only
    spacing: str = "linspace"  # timesteps of ddim/ddpm: linspace | leading (the official code) | trailing
    cfg_scale: float = 1.0  # classifier-free guidance (1: none)
    guide_scale: float = 1.0  # guided sampling (Conditioning.guide): DPS's zeta, the step is zeta / sqrt(loss) x grad
    guide_grad: str = "unet"  # guided sampling: the gradient through the UNet (true DPS) or stopped at z0 ("z0")

    def validate(self, prefix: str = "") -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"config key '{prefix}sampler' = {self.sampler!r}: choose one of {list(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"config key '{prefix}spacing' = {self.spacing!r}: choose one of {list(SPACINGS)}")
        if self.steps < 1:
            raise ConfigError(f"config key '{prefix}steps' = {self.steps}: expected at least 1")
        if self.guide_grad not in ("unet", "z0"):
            raise ConfigError(f"config key '{prefix}guide_grad' = {self.guide_grad!r}: choose unet (true DPS) or z0")

    def check(self, schedule) -> None:
        """ValueError for a sampler that does not fit the schedule's objective, options the sampler
        does not take, or a step count the spacing cannot place: before any sampling starts."""
        check_options(schedule, self.sampler, self.eta, self.spacing)
        if self.sampler in ("ddim", "ddpm"):
            vp_timesteps(schedule, self.steps, self.spacing)
        elif self.steps < 1:
            raise ValueError(f"steps {self.steps}: expected at least 1")


def default_spec(flow: bool) -> SamplingSpec:
    """The built-in spec of a UNet's objective: euler for rectified flow, else SamplingSpec()."""
    return SamplingSpec(sampler=FLOW_SAMPLERS[0]) if flow else SamplingSpec()


def spec_of(obj) -> SamplingSpec:
    """The SamplingSpec part of a config that extends it (the training `samples` section)."""
    return SamplingSpec(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(SamplingSpec)})


@dataclass
class Conditioning:
    """What a batch of B samples is conditioned on; a part left None is unconditional.

    prompts: B strings (text-conditioned UNets; "" is the unconditional prompt).
    labels: (B,) class indices (class-conditional UNets).
    guide: conditions on boxes of the canvas (infd.solve.conditions.RegionGuide: z in the autoencoder's units
      -> loss (B,)); sampling then follows them by diffusion posterior sampling (infd.solve.dps), with
      SamplingSpec.guide_scale and guide_grad, on ddim or ddpm steps.
    lowres: (B, C, h, w) a super-resolution UNet's condition: the low-resolution image's latent (the image
      resized to the encoder's input and encoded), in the autoencoder's units, on the sampled latent's grid;
      both guidance branches get it, at noise level 0.
    """

    prompts: list[str] | None = None
    labels: Tensor | None = None
    guide: Callable[[Tensor], Tensor] | None = None
    lowres: Tensor | None = None
