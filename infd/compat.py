"""Reading what older versions wrote: the one place for compatibility code.

- Exports of format 1 kept their metadata in an untyped "extra" mapping (step, ema, latent_scale,
  diffusion, text, sampling, autoencoder); `export_meta_v2` lays it out as format 2, which
  infd.export.ExportRecord reads.
- Training checkpoints: state.json before the data position was a global sample count (it held
  "data_epoch", or a per-epoch count), before the task's state had its own entry ("latent_scale"
  at the top level), and before it recorded the latent scale at all (the run logged it with every
  step in metrics.jsonl: `logged_latent_scale`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from infd.config import ConfigError

log = logging.getLogger("train")

_V1_SECTIONS = ("step", "ema", "text", "sampling", "autoencoder")


def export_meta_v2(meta: dict, where: str = "") -> dict:
    """An export's config.json contents in format 2 (format 2 is returned as it is)."""
    version = meta.get("format_version")
    if version == 2:
        return meta
    if version != 1:
        raise ConfigError(f"{where}export format {version!r} is not supported (expected 1 or 2): re-export it "
                          "with this version (python -m train.export RUN_DIR)")
    extra = meta.get("extra") or {}
    diffusion = extra.get("diffusion")
    if "latent_scale" in extra:  # format 1 kept the resolved scale beside the schedule, which may say "auto"
        diffusion = {**(diffusion or {}), "latent_scale": extra["latent_scale"]}
    return {"format_version": 2, "kind": meta.get("kind"), "config": meta.get("config"), "diffusion": diffusion,
            **{k: extra.get(k) for k in _V1_SECTIONS}}


def logged_latent_scale(metrics: Path, step: int) -> float | None:
    """The latent scale a run logged at `step` in its metrics.jsonl, None if it logged none."""
    for line in metrics.read_text().splitlines() if metrics.exists() else ():
        entry = json.loads(line)
        if entry.get("step") == step and "latent_scale" in entry:
            return float(entry["latent_scale"])
    return None


def checkpoint_data_position(state: dict, grad_accum: int) -> dict:
    """The loader position ({"epoch", "slot", "batches"}) of a checkpoint's state.json. One that
    predates global positions resumes at the start of the epoch after the one it was in."""
    data = state.get("data") or {"epoch": state.get("data_epoch", -1), "consumed": state["step"] * grad_accum}
    if "slot" in data:
        return data
    log.warning("data position %s predates global positions: continuing at the next epoch", data)
    return {"epoch": data.get("epoch", 0) + 1, "slot": 0, "batches": data.get("consumed", 0)}


def checkpoint_task_state(state: dict) -> dict:
    """The task's own state in a checkpoint's state.json ({} for a stage that keeps none)."""
    if "task" in state:
        return state["task"]
    return {"latent_scale": state["latent_scale"]} if "latent_scale" in state else {}
