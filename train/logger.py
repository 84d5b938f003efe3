"""Metrics and image logging: W&B on rank 0, or nothing. Throughput and data-wait timing."""
from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from train.dist import DistInfo
from train.panels import PanelWriter

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
    """log_scalars / log_images on rank 0 only; every other rank gets a no-op. Image panels always
    go to RUN_DIR/images (PNGs and index.html), and to W&B when it is the logger; a progress bar
    runs when rank 0's stderr is a terminal."""

    def __init__(self, cfg, info: DistInfo, run_dir, run_name: str, config: dict, group: str | None = None,
                 max_steps: int | None = None):
        self.info, self.run, self.max_steps, self.bar = info, None, max_steps, None
        self.panels = PanelWriter(Path(run_dir) / "images", run_name) if info.is_main else None
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
        line = progress_line(step, self.max_steps, clean)
        self.bar.write(line) if self.bar is not None else log.info("%s", line)

    def step_done(self, step: int) -> None:
        """Advance the progress bar (rank 0, attached to a terminal)."""
        if not (self.info.is_main and self.max_steps and sys.stderr.isatty()):
            return
        if self.bar is None:
            self.bar = tqdm(total=self.max_steps, initial=step - 1, unit="step", dynamic_ncols=True)
        self.bar.update(1)

    def log_images(self, images: dict, step: int) -> None:
        """images: name -> (B, 3, H, W) in [-1, 1], or (that, B captions); one panel each."""
        if self.panels is not None:
            self.panels.write(images, step)
        if self.run is None:
            return
        from infd.image import tensor_to_pil

        panels = {}
        for name, value in images.items():
            batch, captions = value if isinstance(value, tuple) else (value, [None] * len(value))
            panels[name] = [self.wandb.Image(tensor_to_pil(x), caption=c) for x, c in zip(batch, captions)]
        self.run.log(panels, step=step)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()


def progress_line(step: int, max_steps: int | None, values: dict) -> str:
    """'step 120/1000 | 43.1 samples/s | 0.37 s/step | ETA 5m26s | loss=0.41 ...'"""
    head = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]
    rate, per_step = values.get("perf/samples_per_s"), values.get("perf/s_per_step")
    if rate is not None:
        head.append(f"{rate:.1f} samples/s")
    if per_step is not None:
        head.append(f"{per_step:.2f} s/step")
        if max_steps:
            head.append(f"ETA {duration(per_step * (max_steps - step))}")
    rest = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())
                    if k not in ("perf/samples_per_s", "perf/s_per_step"))
    return " | ".join([*head, rest])


def duration(seconds: float) -> str:
    """4000 -> '1h06m', 326 -> '5m26s', 12.3 -> '12s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


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
        self.steps = 0

    def data_wait(self, seconds: float, samples: int) -> None:
        """Once per step: the seconds it waited for its batches and the samples in them."""
        self.wait += seconds
        self.samples += samples
        self.steps += 1

    def read(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"perf/samples_per_s": self.samples * world_size / elapsed, "perf/data_wait_frac": self.wait / elapsed,
               "perf/s_per_step": elapsed / max(self.steps, 1)}
        self.reset()
        return out


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
