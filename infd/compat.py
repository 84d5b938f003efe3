"""Reading what older versions wrote: the one place for compatibility code.

- Exports of format 1 kept their metadata in an untyped "extra" mapping (step, ema, latent_scale,
  diffusion, text, sampling, autoencoder); `export_meta_v2` lays it out as format 2, which
  infd.export.ExportRecord reads.
- Training checkpoints written before state.json recorded the diffusion stage's latent scale:
  the run logged it with every step in metrics.jsonl (`logged_latent_scale`).
"""
from __future__ import annotations

import json
from pathlib import Path

from infd.config import ConfigError

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
