"""Metrics and image logging: W&B on rank 0, or nothing. Throughput and data-wait timing."""
from __future__ import annotations

import logging
import re
import time

import torch

from train.dist import DistInfo

log = logging.getLogger("train")
SECRET_KEY = re.compile(r"(key|token|secret|password|credential)", re.IGNORECASE)


def redact(obj):
    """Copy of a nested config with values under secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class Logger:
    """log_scalars / log_images on rank 0 only; every other rank gets a no-op."""

    def __init__(self, cfg, info: DistInfo, run_dir, run_name: str, config: dict, group: str | None = None):
        self.info, self.run = info, None
        if cfg.kind == "wandb" and info.is_main:
            import wandb

            self.wandb = wandb
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, group=group,
                                  dir=str(run_dir), config=redact(config), mode=cfg.mode, tags=cfg.tags,
                                  id=_run_id(run_dir),
                                  resume="allow")

    def log_scalars(self, values: dict, step: int) -> None:
        if not self.info.is_main:
            return
        clean = {k: float(v) for k, v in values.items()}
        if self.run is not None:
            self.run.log(clean, step=step)
        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items())))

    def log_images(self, images: dict, step: int) -> None:
        """images: name -> (B, 3, H, W) in [-1, 1], or (that, B captions); one panel each."""
        if self.run is None:
            return
        from infd.image import tensor_to_pil

        panels = {}
        for name, value in images.items():
            batch, captions = value if isinstance(value, tuple) else (value, [None] * len(value))
            panels[name] = [self.wandb.Image(tensor_to_pil(x), caption=c) for x, c in zip(batch, captions)]
        self.run.log(panels, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _run_id(run_dir) -> str:
    """Stable id per run directory, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


class Throughput:
    """samples/s and the fraction of wall time spent waiting for data, between two reads."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def data_wait(self, seconds: float, samples: int) -> None:
        self.wait += seconds
        self.samples += samples

    def read(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"perf/samples_per_s": self.samples * world_size / elapsed, "perf/data_wait_frac": self.wait / elapsed}
        self.reset()
        return out


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
