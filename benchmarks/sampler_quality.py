"""Sampler quality on a trained toy: a 2-D mixture of 8 Gaussians on a ring.

A small MLP learns epsilon with the paper's schedule (1000 steps, beta 0.0015 -> 0.0195); then
each sampler draws 4000 points, compared by sliced Wasserstein-1 distance (64 projections) with
fresh data and with DDPM at 1000 steps (the reference). The noise floor is the distance between
two independent draws of the data itself.

    python benchmarks/sampler_quality.py [--train-steps 4000]

Last line: {"samplers": {NAME: {"nfe": N, "distance": D, "distance_to_ddpm": D2}, ...}, ...}
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infd.diffusion.samplers import sample  # noqa: E402
from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_loss  # noqa: E402
from infd.keyed_random import KeyedRandom  # noqa: E402
from infd.models.unet import timestep_embedding  # noqa: E402


def ring_mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = k.float() * 2 * math.pi / 8
    centres = torch.stack([angle.cos(), angle.sin()], 1) * 2.0
    return centres + 0.15 * torch.randn(n, 2, generator=generator)


class ToyDenoiser(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, 64)], 1))


def sliced_w1(a: torch.Tensor, b: torch.Tensor, projections: int = 64, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(projections, 2, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (a @ dirs.t()).sort(0).values, (b @ dirs.t()).sort(0).values
    return float((pa - pb).abs().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=4000)
    p.add_argument("--samples", type=int, default=4000)
    args = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    schedule = build_schedule(DiffusionConfig())
    model = ToyDenoiser()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.train_steps)
    start = time.time()
    for step in range(args.train_steps):
        loss, _ = training_loss(model, schedule, ring_mixture(512, g), KeyedRandom(0, step, range(512)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"trained the toy denoiser: {args.train_steps} steps in {time.time() - start:.0f} s, last loss "
          f"{loss.item():.4f}", flush=True)
    model.eval()
    data, data2 = ring_mixture(args.samples, g), ring_mixture(args.samples, g)
    runs = {"ddpm": ("ddpm", 1000, 0.0), "ddim_50": ("ddim", 50, 0.0), "ddim_20": ("ddim", 20, 0.0),
            "dpmpp": ("dpmpp", 20, 0.0), "dpmpp_10": ("dpmpp", 10, 0.0)}
    draws = {}
    for name, (sampler, steps, eta) in runs.items():
        with torch.no_grad():
            draws[name] = sample(model, schedule, (args.samples, 2), sampler, steps,
                                 generator=torch.Generator().manual_seed(1), eta=eta)
    result = {"samplers": {}, "noise_floor": round(sliced_w1(data, data2), 4), "metric": "sliced W1, 64 projections",
              "data": "8-Gaussian ring, radius 2, std 0.15"}
    for name, (sampler, steps, _) in runs.items():
        result["samplers"][name] = {"nfe": steps, "distance": round(sliced_w1(draws[name], data), 4),
                                    "distance_to_ddpm": round(sliced_w1(draws[name], draws["ddpm"]), 4)}
        print(f"{name:9s} nfe {steps:5d}  distance to data {result['samplers'][name]['distance']:.4f}  "
              f"to ddpm-1000 {result['samplers'][name]['distance_to_ddpm']:.4f}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
