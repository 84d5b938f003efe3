"""Samplers: DDPM ancestral, DDIM (eta; timestep spacing linspace, leading or trailing),
DPM-Solver++ (2M, log-SNR spaced steps) for VP schedules; Euler and Heun for rectified flow.
Classifier-free guidance wraps the model function; a torch.Generator makes a run reproducible.

model_fn(x, t) -> network output in the schedule's parameterisation; t is a (B,) tensor of
integer steps (VP) or of floats in [0, 1] (flow).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from infd.diffusion.schedule import FlowSchedule, VPSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler", "heun")
SPACINGS = ("linspace", "leading", "trailing")  # timestep spacings of ddim / ddpm on a subset


def guided(model_fn: Callable, cond, uncond, scale: float) -> Callable:
    """Classifier-free guidance: u + scale * (c - u), one batched call for both branches."""
    if scale == 1.0 or uncond is None:
        return lambda x, t: model_fn(x, t, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        both = model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, uncond))
        c, u = both.chunk(2)
        return u + scale * (c - u)

    return fn


def _cat_cond(cond, uncond):
    if isinstance(cond, dict):
        return {k: None if cond[k] is None else torch.cat([cond[k], uncond[k]]) for k in cond}
    return torch.cat([cond, uncond])


def vp_timesteps(schedule: VPSchedule, steps: int, spacing: str = "linspace") -> list[int]:
    """Descending integer timesteps in [0, T) for DDIM / DDPM on a subset of the T training steps
    (the names of diffusers' `timestep_spacing`):

    linspace  round(linspace(T-1, 0, steps)): both ends, T-1 and 0.
    leading   the official LDM / INFD DDIM stride (CompVis latent-diffusion `make_ddim_timesteps`,
              ddim_discr_method="uniform"): c = T // steps, t = 0, c, 2c, ... < T, plus the
              schedule's steps_offset (1 by default, as the official code; diffusers' key of that
              name); for T = 1000 and 200 steps 996, 991, ..., 1. The list has ceil(T / c) entries,
              which is `steps` when steps divides T: then it equals diffusers' DDIMScheduler list.
              Otherwise it has more, as in the official code (diffusers keeps `steps` entries); a
              list that would reach t = T (e.g. 300 or 1000 of 1000 steps with offset 1: the
              official code fails there) is refused.
    trailing  round(T - i T / steps) - 1, i = 0..steps-1: starts at T-1 (diffusers' "trailing").
    """
    T = schedule.timesteps
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {list(SPACINGS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"{steps} sampling steps: expected 1 to {T} (the training steps)")
    if spacing == "linspace":
        return [int(round(v)) for v in torch.linspace(T - 1, 0, steps).tolist()]
    if spacing == "trailing":
        # i * T / steps rather than diffusers' arange(T, 0, -T / steps): same values, and always
        # exactly `steps` of them (a float stop can add one more).
        return [int(round(T - i * (T / steps))) - 1 for i in range(steps)]
    offset = getattr(schedule.cfg, "steps_offset", 1)
    ts = [t + offset for t in range(0, T, T // steps)]  # the official offset 1 never samples at t = 0
    if ts[-1] >= T:
        fits = [d for d in range(min(steps, T - 1), 0, -1) if T % d == 0][:1]  # a divisor below T always fits
        raise ValueError(f"spacing 'leading' with {steps} of {T} steps would need t = {ts[-1]} "
                         f"(stride {T} // {steps} = {T // steps}, then steps_offset {offset}); use a step "
                         f"count below {T} that divides it{f' (e.g. {fits[0]})' if fits else ''} or spacing "
                         "'linspace' / 'trailing'")
    return ts[::-1]


def logsnr_timesteps(schedule: VPSchedule, steps: int) -> list[int]:
    """Integer timesteps whose log(alpha/sigma) are closest to an even grid from noise to data:
    few-step solvers need small steps where the log-SNR moves fast (near the data)."""
    abar = schedule.alphas_cumprod
    lam = 0.5 * torch.log(abar / (1 - abar))
    grid = torch.linspace(float(lam[-1]), float(lam[0]), steps)
    ts = [int((lam - g).abs().argmin()) for g in grid]
    return sorted(set(ts), reverse=True)


def abar_at(schedule: VPSchedule, t: int) -> float:
    """abar_t; t = -1 is the end of the chain: 1, or alphas_cumprod[0] without set_alpha_to_one."""
    return schedule.final_alpha_cumprod if t < 0 else float(schedule.alphas_cumprod[t])


def progress_steps(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="step", leave=False)


def randn(shape, generator=None, device=None, dtype=None) -> Tensor:
    """Gaussian noise of `shape` (B, ...). generator: one torch.Generator for the whole batch, or a
    list of B, one per sample, so that sample i does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def ddim(model_fn, schedule: VPSchedule, noise: Tensor, steps: int, eta: float = 0.0,
         generator: torch.Generator | None = None, progress: bool = False,
         spacing: str = "linspace") -> Tensor:
    """DDIM (Song et al. 2021) from noise (B, ...) to data (B, ...) on vp_timesteps(schedule,
    steps, spacing). eta = 1 is DDPM's ancestral sampler on the same timesteps.

    The last step goes to the clean data (abar = 1), also after 'leading' timesteps, whose last
    is t = 1; with the schedule's set_alpha_to_one=False it stops at abar_0 instead, as the
    official LDM sampler and diffusers' DDIMScheduler with SD's configs (a difference of
    sqrt(abar_0) = 0.9992 in scale and beta_0 in variance for the paper's schedule).

    Step i goes from ts[i] to ts[i + 1]. diffusers' DDIMScheduler goes to t - T // steps instead:
    the same for 'leading' and 'trailing' when steps divides T, not for 'linspace'. With eta > 0
    the noise of each step is drawn by `randn` from `generator` after the model call."""
    x = noise
    ts = vp_timesteps(schedule, steps, spacing)
    for i in progress_steps(range(len(ts)), progress, "ddim" if eta == 0 else "ddpm"):
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        x0, eps = schedule.to_x0_eps(model_fn(x, torch.full((x.shape[0],), t, device=x.device)), x,
                                     torch.full((x.shape[0],), t, device=x.device))
        a_t, a_prev = abar_at(schedule, t), abar_at(schedule, t_prev)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x


def ddpm(model_fn, schedule: VPSchedule, noise: Tensor, steps: int | None = None,
         generator: torch.Generator | None = None, progress: bool = False,
         spacing: str = "linspace") -> Tensor:
    """Ancestral sampling (Ho et al. 2020), on all T steps by default, else on
    vp_timesteps(schedule, steps, spacing)."""
    return ddim(model_fn, schedule, noise, steps or schedule.timesteps, eta=1.0, generator=generator,
                progress=progress, spacing=spacing)


@torch.no_grad()
def dpmpp_2m(model_fn, schedule: VPSchedule, noise: Tensor, steps: int, progress: bool = False) -> Tensor:
    """DPM-Solver++ (2M), data prediction, multistep second order (Lu et al. 2022); the final
    step to the clean data is first order."""
    x = noise
    ts = logsnr_timesteps(schedule, steps)
    lam = lambda t: 0.5 * math.log(abar_at(schedule, t) / (1 - abar_at(schedule, t)))  # noqa: E731  log(alpha/sigma)
    prev_x0, prev_h = None, None
    for i in progress_steps(range(len(ts)), progress, "dpm-solver++"):
        t = ts[i]
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0, _ = schedule.to_x0_eps(model_fn(x, tt), x, tt)
        if i + 1 == len(ts):
            return x0  # to sigma = 0: x = the data prediction
        t_next = ts[i + 1]
        h = lam(t_next) - lam(t)
        d = x0
        if prev_x0 is not None:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        sigma, sigma_next = math.sqrt(1 - abar_at(schedule, t)), math.sqrt(1 - abar_at(schedule, t_next))
        alpha_next = math.sqrt(abar_at(schedule, t_next))
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


@torch.no_grad()
def euler(model_fn, noise: Tensor, steps: int, heun: bool = False, progress: bool = False) -> Tensor:
    """Rectified flow from t = 1 (noise) to t = 0 (data): Euler, or Heun's second order."""
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for i in progress_steps(range(steps), progress, "heun" if heun else "euler"):
        t, t_next = ts[i], ts[i + 1]
        v = model_fn(x, torch.full((x.shape[0],), t, device=x.device))
        x_next = x + (t_next - t) * v
        if heun:
            v_next = model_fn(x_next, torch.full((x.shape[0],), t_next, device=x.device))
            x_next = x + (t_next - t) * 0.5 * (v + v_next)
        x = x_next
    return x


def sample(model_fn, schedule, shape, sampler: str, steps: int, generator=None,
           device=None, eta: float = 0.0, progress: bool = False, spacing: str = "linspace") -> Tensor:
    """Draw samples of `shape` (B, ...) from noise with the named sampler (see SAMPLERS).

    eta (DDIM's noise, 0 deterministic .. 1 ancestral) and spacing (see vp_timesteps) belong to
    ddim; ddpm takes spacing and is eta = 1 itself. Samplers without them (dpmpp, which spaces
    its steps in log-SNR; euler; heun) refuse a non-default eta or spacing rather than ignore it.
    """
    check_options(schedule, sampler, eta, spacing)
    noise = randn(shape, generator, device)
    if sampler == "ddpm":
        return ddpm(model_fn, schedule, noise, steps, generator, progress, spacing)
    if sampler == "ddim":
        return ddim(model_fn, schedule, noise, steps, eta, generator, progress, spacing)
    if sampler == "dpmpp":
        return dpmpp_2m(model_fn, schedule, noise, steps, progress)
    return euler(model_fn, noise, steps, heun=sampler == "heun", progress=progress)


def check_options(schedule, sampler: str, eta: float, spacing: str) -> None:
    """ValueError, naming the choices, for a sampler that does not fit the schedule or options
    that the sampler does not have (so nobody believes they applied)."""
    flow = isinstance(schedule, FlowSchedule)
    if flow != (sampler in ("euler", "heun")):
        kind = "rectified flow" if flow else "a VP (epsilon/v) objective"
        raise ValueError(f"sampler {sampler!r} does not fit {kind}; choose from "
                         f"{['euler', 'heun'] if flow else ['ddpm', 'ddim', 'dpmpp']}")
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {list(SPACINGS)}")
    if spacing != "linspace" and sampler not in ("ddim", "ddpm"):
        raise ValueError(f"timestep spacing {spacing!r} applies to ddim and ddpm only; sampler "
                         f"{sampler!r} has its own steps (dpmpp: log-SNR spaced; euler/heun: uniform in t)")
    allowed = {"ddim": None, "ddpm": (0.0, 1.0)}.get(sampler, (0.0,))  # 0.0 = not set; ddpm is eta 1
    if allowed is not None and eta not in allowed:
        raise ValueError(f"eta={eta} applies to ddim only; sampler {sampler!r} "
                         + ("is eta = 1 itself: use ddim for another eta" if sampler == "ddpm" else "has no eta"))
    if sampler == "ddim" and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta}: expected a value in [0, 1] (0 deterministic DDIM, 1 ancestral)")
