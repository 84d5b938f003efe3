"""Diffusion posterior sampling (Chung et al., "Diffusion Posterior Sampling for General Noisy Inverse
Problems", ICLR 2023) on DDIM / DDPM steps: each step estimates the clean latent z0 from the network's
prediction, scores renders of it against the conditions (infd.solve.conditions.RegionGuide), and moves
the sample against the gradient of that loss.

    x_{t-1} = DDIM/DDPM step(x_t, z0, eps)  -  zeta * sum_k grad_{x_t} L_k(z0(x_t)) / sqrt(L_k)

with L_k condition k's (weighted) loss per sample (for an L2 condition L = ||y - A(z0)||^2, so each term is
DPS's zeta_t = zeta / ||y - A(z0)|| with the gradient of the squared norm): every condition takes its own DPS
step, so a condition over many pixels does not shrink the step of one over few. grad="unet" takes the
gradient through the UNet (true DPS: one backward pass of the UNet per step); grad="z0" stops it at z0 and
uses d z0 / d x_t ~ 1 / sqrt(abar_t) (the UNet's own dependence on x_t dropped): no UNet backward pass, a
cheaper and cruder step. Classifier-free guidance is part of model_fn (infd.diffusion.samplers.guided).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from infd.diffusion.samplers import abar_at, progress_steps, randn, vp_timesteps
from infd.diffusion.schedule import VPSchedule

GRADS = ("unet", "z0")


def dps(model_fn: Callable, schedule: VPSchedule, noise: Tensor, steps: int, loss_fn: Callable[[Tensor], Tensor],
        scale: float, grad: str = "unet", eta: float = 0.0, generator=None, progress: bool = False,
        spacing: str = "linspace") -> Tensor:
    """From noise (B, ...) to data, guided by loss_fn(z0) -> (B,) or per condition (B, K) (see the module
    docstring); scale is zeta.
    eta = 1 is DDPM's ancestral step on the same timesteps."""
    if grad not in GRADS:
        raise ValueError(f"guidance gradient {grad!r}: choose one of {list(GRADS)}")
    x = noise
    ts = vp_timesteps(schedule, steps, spacing)
    for i in progress_steps(range(len(ts)), progress, "dps"):
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        a_t, a_prev = abar_at(schedule, t), abar_at(schedule, t_prev)
        x0, eps, step = _guided_estimate(model_fn, schedule, x, t, a_t, loss_fn, scale, grad)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        x = x - step
    return x


def _guided_estimate(model_fn, schedule, x: Tensor, t: int, a_t: float, loss_fn, scale: float, grad: str):
    """(z0, eps, the guidance step) at x_t, all detached."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(grad == "unet")
        with torch.set_grad_enabled(grad == "unet"):
            x0, eps = schedule.to_x0_eps(model_fn(x_in, tt), x_in, tt)
        wrt = x_in if grad == "unet" else x0.detach().requires_grad_(True)
        losses = loss_fn(x0 if grad == "unet" else wrt)
        losses = losses if losses.dim() == 2 else losses[:, None]
        # sum_k grad L_k / sqrt(L_k): each condition's own DPS step (the denominators are constants here)
        (g,) = torch.autograd.grad((losses / losses.detach().clamp_min(1e-12).sqrt()).sum(), wrt)
    if grad == "z0":
        g = g / math.sqrt(a_t)
    return x0.detach(), eps.detach(), scale * g
