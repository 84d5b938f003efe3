"""Evaluation inside training, every trainer.eval_every steps, with the EMA weights.

Stage 2: FID-256 / pFID P/1K (and CLIP score) of `eval.num_samples` samples against the real
images of `eval.shards`, through the same code as `infd eval-gen` (infd.eval.generative),
sharded over the ranks. Stage 1: reconstruction PSNR at several scales, LPIPS and scale
consistency on `eval.num_images` held-out images, through the code of `infd eval-ae`
(infd.eval.reconstruction), sharded over the ranks the same way. Both return
{"eval/<metric>": value} on rank 0 ({} on the others); metric names carry `_randinit` when a
network is random-init.

A stop signal abandons an evaluation in progress: `should_stop` (the loop's all-reduced stop flag)
is checked before every round of batches, on every rank alike, and EvaluationStopped reaches the
loop on every rank at the same point; it logs nothing for it and checkpoints.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from infd.config import ConfigError
from infd.diffusion.spec import spec_of
from infd.eval.generative import METRIC_PREFIXES, GenEvalConfig, build_networks, evaluate_generator
from infd.eval.pfid import PFID_SIZE
from infd.eval.real_set import (RealSet, choose_real_set, open_source, read_or_skip, require_captions,
                                 stoppable_batches)
from infd.eval.samples import ImageSampler
from infd.eval.reconstruction import centre_square, metric_keys, reconstruction_sums
from train.dist import DistInfo
from train.run_exports import averaged_copy

log = logging.getLogger("train")


PROMPT_SOURCES = ("captions", "samples")


@dataclass
class GenerativeEvalConfig(GenEvalConfig):
    """Stage 2's eval section: GenEvalConfig (num_samples, patches, features, ...) plus the real images."""

    shards: list[str] = field(default_factory=list)  # indexed real-image shards; default: data.loader.shards (images)
    index: str | None = None
    # Text models' prompts: "captions" (sample i takes real image i's caption, the COCO protocol) or
    # "samples" (samples.prompts cycle).
    prompts: str = "captions"

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if self.prompts not in PROMPT_SOURCES:
            raise ConfigError(f"config key '{prefix}prompts' = {self.prompts!r}: expected one of {PROMPT_SOURCES}")


@dataclass
class ReconstructionEvalConfig:
    """Stage 1's eval section."""

    shards: list[str] = field(default_factory=list)  # held-out indexed image shards (required with eval_every)
    index: str | None = None
    num_images: int = 16
    scales: list[int] = field(default_factory=lambda: [1, 2, 4])

    def validate(self, prefix: str = "") -> None:
        if self.num_images < 1 or any(s < 1 for s in self.scales) or not self.scales:
            raise ConfigError(f"config keys '{prefix}num_images' = {self.num_images} / '{prefix}scales' = "
                              f"{self.scales}: expected at least 1 image and factors >= 1")


@contextmanager
def own_rng(device: torch.device):
    """Evaluation draws nothing from, and leaves unchanged, the global RNGs that training uses:
    a run with trainer.eval_every trains exactly like one without."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def open_real_set(shards: list[str], index: str | None, n: int, min_side: int, key: str) -> RealSet:
    if not shards:
        raise ConfigError(f"config key '{key}' is empty: trainer.eval_every needs indexed image shards to "
                          "compare with (or set trainer.eval_every=0)")
    real = choose_real_set(open_source(shards, index), n, min_side)
    if len(real.ids) < 2:
        raise ConfigError(f"config key '{key}': {len(real.ids)} image(s) with a short side >= {min_side} "
                          f"({real.skipped_small} smaller skipped); evaluation needs at least 2")
    return real


def prefixed(metrics: dict | None, elapsed: float) -> dict:
    """The metrics under eval/ plus the time taken; {} on ranks other than 0."""
    if metrics is None:
        return {}
    return {f"eval/{k}": float(v) for k, v in metrics.items()} | {"eval/seconds": elapsed}


class GenerativeEval:
    """Stage 2: the real set is chosen and the feature (and CLIP) networks are built once, at
    start (missing weights fail then, not at the first evaluation); they wait on the CPU."""

    def __init__(self, cfg: GenerativeEvalConfig, samples, info: DistInfo, fallback_shards: list[str], text: bool):
        self.cfg, self.samples, self.info = cfg, samples, info
        shards = list(cfg.shards) or list(fallback_shards)
        self.real = open_real_set(shards, cfg.index, cfg.real_count, PFID_SIZE if cfg.patches else cfg.fid_size,
                                  "eval.shards")
        self.networks = build_networks(cfg, text, "eval.")
        self.captions = self.real if text and cfg.prompts == "captions" else None
        if self.captions is not None:
            require_captions(self.real, "config key 'eval.prompts' = captions",
                             "set eval.prompts=samples to cycle samples.prompts")

    def __call__(self, model, ema, ae, should_stop=None) -> dict:
        """model: the LatentDiffusion of the engine's UNet module, whose EMA weights are evaluated."""
        start = time.perf_counter()
        try:
            metrics = self._evaluate(model, ema, ae, should_stop)
        finally:
            for net in self.networks:
                if net is not None:
                    net.to("cpu")  # off the accelerator between evaluations
        return prefixed(metrics, time.perf_counter() - start)

    def _evaluate(self, model, ema, ae, should_stop) -> dict | None:
        model = replace(model, unet=averaged_copy(model.unet, ema, "unet").to(self.info.device))
        s = self.samples
        sampler = ImageSampler(model, ae, spec_of(s), self.cfg.seed, s.latent_size, s.prompts, self.captions)
        metrics = evaluate_generator(sampler, self.real, self.cfg, self.info.device, self.info.rank,
                                     self.info.world_size, store=None, progress=False, networks=self.networks,
                                     should_stop=should_stop)
        if metrics is None:
            return None
        return {k: v for k, v in metrics.items() if k.startswith(METRIC_PREFIXES) or k == "prompts_empty"}


class ReconstructionEval:
    """Stage 1: PSNR/LPIPS of the EMA autoencoder on held-out images (the first num_images whose
    short side is at least the model's input size), each rank a share, summed over ranks."""

    def __init__(self, cfg: ReconstructionEvalConfig, base: int, info: DistInfo):
        self.cfg, self.base, self.info = cfg, base, info
        self.real = open_real_set(cfg.shards, cfg.index, cfg.num_images, base, "eval.shards")

    def _images(self, skips: dict, should_stop):
        for positions in stoppable_batches(len(self.real.ids), 1, self.info.rank, self.info.world_size, should_stop):
            img = read_or_skip(self.real, positions[0], skips)
            if img is not None:
                yield positions[0], centre_square(img)

    def __call__(self, module, ema, lpips_net, should_stop=None) -> dict:
        start = time.perf_counter()
        return prefixed(self._evaluate(module, ema, lpips_net, should_stop), time.perf_counter() - start)

    def _evaluate(self, module, ema, lpips_net, should_stop) -> dict | None:
        model = averaged_copy(module, ema, "autoencoder").to(self.info.device)
        scales = tuple(self.cfg.scales)
        sums, counts = reconstruction_sums(model, self._images({}, should_stop), self.info.device, scales, self.base,
                                           lpips_net, progress=False)
        keys = metric_keys(scales, lpips_net is not None)
        totals = torch.tensor([[sums[k] for k in keys], [counts[k] for k in keys]], dtype=torch.float64)
        if self.info.world_size > 1:
            import torch.distributed as dist

            totals = totals.to(self.info.device)
            dist.all_reduce(totals)
        if not self.info.is_main:
            return None
        suffix = {"lpips_1x": "_randinit"} if getattr(lpips_net, "is_random_init", False) else {}
        return {k + suffix.get(k, ""): float(s / c) for k, s, c in zip(keys, *totals.cpu().tolist()) if c}
