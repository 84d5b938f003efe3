"""Noise schedules and the objectives stage 2 trains with.

Variance preserving (DDPM): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t = 0..T-1, with the
paper's schedule: T = 1000, beta linear from 0.0015 to 0.0195. The network predicts eps
(`epsilon`, the paper) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (`v`). Stable Diffusion's
schedule is `scaled_linear` (beta linear in sqrt(beta), 0.00085 to 0.012); its sampling options
(steps_offset, set_alpha_to_one) are diffusers' scheduler keys of the same names.
Rectified flow: x_t = (1 - t) x0 + t eps, t in [0, 1], the network predicts the velocity eps - x0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from infd.config import ConfigError
from infd.diffusion.align import AlignConfig
from infd.keyed_random import KeyedRandom


@dataclass
class DiffusionConfig:
    objective: Literal["epsilon", "v", "rectified_flow"] = "epsilon"
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    # z is multiplied by this before diffusion: "auto" = 1 / std of the first latents (LDM's scale
    # factor, unit-variance inputs); the paper trains on raw z (1.0).
    latent_scale: Literal["auto"] | float = "auto"
    latent_scale_samples: int = 256  # latents the "auto" scale is estimated from, at start
    # linear: beta = linspace(beta_start, beta_end, T) (the paper); scaled_linear: beta =
    # linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (Stable Diffusion, LDM's "linear").
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    # Added to the 'leading' DDIM timesteps: 1 = the official LDM code and SD's scheduler configs
    # (diffusers' steps_offset=1); 0 = diffusers' default, which samples at t = 0.
    steps_offset: int = 1
    # The last DDIM step goes to abar = 1 (True, the clean data) or stops at alphas_cumprod[0]
    # (False: SD's configs and the official LDM sampler), as diffusers' key of that name.
    set_alpha_to_one: bool = True
    # With a pretrained diffusers UNet (unet.kind=diffusers): the schedule (objective, timesteps,
    # betas, steps_offset, set_alpha_to_one) and latent_scale come from its folder
    # (scheduler/scheduler_config.json, vae/config.json), replacing these keys; False keeps them.
    from_source: bool = True
    # Super-resolution UNets (unet.lowres_channels > 0): in training the condition gets Gaussian noise at a
    # level drawn per sample from [0, lowres_noise] (noise augmentation), the level an input of the UNet.
    lowres_noise: float = 0.3
    # Super-resolution: the alignment loss on decoded clean-latent predictions (infd/diffusion/align.py).
    align: AlignConfig = field(default_factory=AlignConfig)

    def validate(self, prefix: str = "") -> None:
        if self.latent_scale != "auto" and not self.latent_scale > 0:
            raise ConfigError(f"config key '{prefix}latent_scale' = {self.latent_scale}: use auto or a number > 0")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"config keys '{prefix}beta_start' < '{prefix}beta_end' must lie in (0, 1)")
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ConfigError(f"config key '{prefix}beta_schedule' is {self.beta_schedule!r}; choose one of "
                              "['linear', 'scaled_linear']")
        if self.timesteps < 2:
            raise ConfigError(f"config key '{prefix}timesteps' = {self.timesteps}: expected at least 2")
        if not 0 <= self.steps_offset < self.timesteps:
            raise ConfigError(f"config key '{prefix}steps_offset' = {self.steps_offset}: expected 0 to "
                              f"{self.timesteps - 1} (1 = LDM / Stable Diffusion)")


class VPSchedule:
    """Discrete variance-preserving schedule; tensors (T,) indexed by integer t in [0, T), float64
    (diffusers computes them in float32: its alphas_cumprod differ by < 1e-6)."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.betas = make_betas(cfg)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # abar after the last DDIM step (diffusers' final_alpha_cumprod)
        self.final_alpha_cumprod = 1.0 if cfg.set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def timesteps(self) -> int:
        return self.cfg.timesteps

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast against `like` (B, ...)."""
        abar = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.cfg.objective == "epsilon":
            return noise
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0

    def to_x0_eps(self, out: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network output at (x, t) -> predicted (x0, eps)."""
        a, s = self.coefficients(t, x)
        if self.cfg.objective == "epsilon":
            eps = out
            return (x - s * eps) / a, eps
        x0 = a * x - s * out  # v-prediction
        return x0, s * x + a * out


class FlowSchedule:
    """Rectified flow: x_t = (1 - t) x0 + t eps, t in [0, 1] (continuous); model predicts eps - x0."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t = t.view((-1,) + (1,) * (x0.ndim - 1)).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """betas (T,) float64 of cfg.beta_schedule."""
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
    raise ConfigError(f"beta_schedule {cfg.beta_schedule!r}: choose one of ['linear', 'scaled_linear']")


def build_schedule(cfg: DiffusionConfig):
    return FlowSchedule(cfg) if cfg.objective == "rectified_flow" else VPSchedule(cfg)


def training_prediction(model_fn, schedule, x0: Tensor, rand: KeyedRandom) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(the network's prediction at a random noise level, its target, x_t, t (B,)).

    x0 (B, C, h, w); rand draws each sample's noise and t from its own key (seed, step, global
    index), so the loss of a global batch does not depend on how it is split over ranks.
    model_fn(x_t, t) -> prediction; t is an integer step (VP) or a float in [0, 1] (flow), which
    the network's time embedding receives as it is (flow: scaled to [0, 1000) by the caller).
    """
    noise = rand.randn(x0.shape[1:], "noise").to(x0.dtype)
    if isinstance(schedule, FlowSchedule):
        t = rand.rand("t")
    else:
        t = rand.randint(schedule.timesteps, "t")
    x_t = schedule.add_noise(x0, noise, t)
    return model_fn(x_t, t), schedule.target(x0, noise, t), x_t, t


def training_loss(model_fn, schedule, x0: Tensor, rand: KeyedRandom) -> tuple[Tensor, Tensor]:
    """(mean squared error of the network's prediction at a random noise level, t (B,)); see
    training_prediction."""
    pred, target, _, t = training_prediction(model_fn, schedule, x0, rand)
    return (pred.float() - target.float()).pow(2).mean(), t
