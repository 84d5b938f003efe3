"""trainer.init_from: start a run from an export's weights, with a fresh optimizer (fine-tuning).

The model's shape comes from the export's config.json, so a run needs no copy of the model
section that trained it; settings that do not change the weights (which parts are frozen,
gradient checkpointing) stay the run's own. A checkpoint to resume from replaces these weights
afterwards: a preempted fine-tuning run resumes, it does not start over.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from infd.config import ConfigError
from infd.export import WEIGHTS, ExportRecord, read_record

log = logging.getLogger("train")
KEY = "trainer.init_from"


def export_record(path: str, kind: str) -> ExportRecord:
    """The export's record, checked to hold a model of `kind`; ConfigError naming the key otherwise."""
    try:
        record = read_record(path)
    except FileNotFoundError as err:
        raise ConfigError(f"config key '{KEY}' = {path}: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"config key '{KEY}' = {path}: {err}") from None
    if record.kind != kind:
        raise ConfigError(f"config key '{KEY}' = {path} holds a {record.kind} export; this stage "
                          f"fine-tunes a {kind}")
    return record


def export_model_config(path: str, kind: str, **keep):
    """The model config of export `path` (kind `kind`), with the fields in `keep` taken from the run."""
    return dataclasses.replace(export_record(path, kind).model, **keep)


def load_export_weights(module: nn.Module, path: str) -> None:
    """Copy the export's weights into `module` (built from export_model_config); every key must match."""
    state = widened_for_lowres(load_file(str(Path(path) / WEIGHTS)), module)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise ConfigError(f"config key '{KEY}' = {path}: its weights do not fit the model: {err}") from None
    # A super-resolution UNet started from a plain one: its level embedding starts at zero (lowres_cond.py).
    missing = [k for k in missing if "level_emb." not in k] if getattr(module, "level_emb", None) else missing
    if missing or unexpected:
        raise ConfigError(f"config key '{KEY}' = {path}: its weights do not fit the model "
                          f"(missing: {_listed(missing)}; unexpected: {_listed(unexpected)})")
    log.info("weights from %s (%s=%s); the optimizer starts fresh", path, KEY, path)


def widened_for_lowres(state: dict, module: nn.Module) -> dict:
    """A plain UNet's first-convolution weight padded with zero input channels where `module` is a
    super-resolution UNet (unet.lowres_channels): it then computes what the plain UNet did."""
    from infd.models.lowres_cond import widen_weight

    own = module.state_dict()
    for key, value in state.items():
        if key.endswith("conv_in.weight") and key in own and own[key].shape[1] > value.shape[1]:
            state[key] = widen_weight(value, own[key].shape[1])
    return state


def _listed(keys: list[str], limit: int = 10) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
