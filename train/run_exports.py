"""The exports of a run, both stages alike: the trained module (or its EMA) as an infd export.

Layout in the run directory: export/<kind>/ at the end of the run (`export_model`, collective),
export/step_XXXXXXX/<kind>/ from a checkpoint (`export_checkpoint`: one process, no DeepSpeed,
no process group), written during training next to the checkpoints of the steps that are
multiples of trainer.export_every (`export_after_checkpoint`), or on request by
`python -m train.export` (train/export.py, which reads the run's config.yaml).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from infd.compat import checkpoint_task_state, logged_latent_scale
from infd.diffusion.spec import spec_of
from infd.export import MODEL_KINDS, ExportRecord, save_export
from train.checkpoint import step_dir_name
from train.config import TrainerConfig
from train.dist import DistInfo
from train.portable import read_ema, read_tensors
from train.zero import gathered

log = logging.getLogger("train")
EXPORT_DIR, RUN_CONFIG = "export", "config.yaml"  # config.yaml: the resolved config train.app writes


def averaged_copy(module: nn.Module, ema, kind: str) -> nn.Module:
    """A fresh CPU copy of `module` with the EMA weights (the module's own without an EMA), in
    eval mode; the engine's module is left alone. Collective (ZeRO-3 gathers the weights)."""
    with gathered(module):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    model = MODEL_KINDS[kind][1](module.cfg)
    model.load_state_dict(state)
    if ema is not None:
        ema.copy_to(model)
    return model.eval()


def export_model(module: nn.Module, ema, record: ExportRecord, run_dir: Path, info: DistInfo) -> Path | None:
    """Write run_dir/export/<kind>/ with the EMA weights when there is an EMA. Collective (ZeRO-3
    gathers the weights on every rank); rank 0 writes and returns the path, the others None."""
    if not info.is_main:
        with gathered(module):  # the other ranks' part of the collective
            pass
        return None
    model = averaged_copy(module, ema, record.kind)
    path = save_export(model, record, run_dir / EXPORT_DIR / record.kind)
    print(f"exported the {'EMA ' if ema is not None else ''}{record.kind} to {path}", flush=True)
    return path


class ExportError(Exception):
    """A run directory or checkpoint that cannot be exported; the message says what is there."""


@dataclass(frozen=True)
class Stage:
    kind: str  # the export's kind (infd.export.MODEL_KINDS)
    engine: str  # the checkpointed engine that holds the exported model
    model_key: str  # the model's config within the stage's config


STAGES = (Stage("autoencoder", "generator", "model"), Stage("unet", "unet", "unet"))


def checkpoint_stage(ckpt: Path) -> Stage:
    """The stage whose engines checkpoint `ckpt` holds."""
    state = json.loads((ckpt / "state.json").read_text())
    stage = next((s for s in STAGES if s.engine in state["engines"]), None)
    if stage is None:
        raise ExportError(f"{ckpt}: engines {state['engines']} are none of a known stage's")
    return stage


def stage_record(cfg, kind: str, step: int, ema: bool) -> ExportRecord:
    """The export record of a stage's run config `cfg` at `step`. The UNet's records its schedule
    (cfg.diffusion, whose latent scale the caller has resolved), text encoder, sampling spec
    (the samples section: `infd sample`'s defaults) and autoencoder."""
    stage = next(s for s in STAGES if s.kind == kind)
    model = getattr(cfg, stage.model_key)
    if kind != "unet":
        return ExportRecord(kind, model, step=step, ema=ema)
    return ExportRecord(kind, model, step=step, ema=ema, diffusion=cfg.diffusion, text=cfg.text,
                        sampling=spec_of(cfg.samples), autoencoder=cfg.data.autoencoder)


def checkpoint_steps(ckpt_root: Path) -> list[int]:
    """Steps of the complete checkpoints (a .tmp one is still being written, or was cut short)."""
    return sorted(int(p.name[5:]) for p in ckpt_root.glob("step_*")
                  if not p.name.endswith(".tmp") and (p / "state.json").exists())


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    root = run_dir / "checkpoints"
    steps = checkpoint_steps(root)
    if not steps:
        raise ExportError(f"no checkpoint in {root}")
    path = root / step_dir_name(steps[-1] if step is None else step)
    if not (path / "state.json").exists():
        raise ExportError(f"no checkpoint of step {step} in {root}; available steps: {', '.join(map(str, steps))}")
    return path


def _latent_scale(cfg, state: dict, run_dir: Path) -> float:
    task = checkpoint_task_state(state)
    if "latent_scale" in task:
        return task["latent_scale"]
    if cfg.diffusion.latent_scale != "auto":
        return float(cfg.diffusion.latent_scale)
    scale = logged_latent_scale(run_dir / "metrics.jsonl", state["step"])  # checkpoints of older versions
    if scale is None:
        raise ExportError(f"the latent scale of step {state['step']} is neither in its state.json nor in "
                          f"{run_dir / 'metrics.jsonl'}")
    return scale


def _weights(ckpt: Path, stage: Stage, use_ema: bool) -> tuple[dict, bool]:
    """The full fp32 weights the ranks wrote (whatever the ZeRO stage and world size), with the EMA's
    in their place when asked for and kept. The exported models hold no buffers, only parameters."""
    state = read_tensors(ckpt, stage.engine, "weights")
    ema = read_ema(ckpt) if use_ema else None
    if ema is not None:
        return state | ema, True
    return state, False


def export_checkpoint(run_dir: Path, ckpt: Path, cfg, out: Path | None = None, use_ema: bool = True) -> Path:
    """Write the export of checkpoint `ckpt` of the run with config `cfg` (default:
    run_dir/export/step_XXXXXXX/<kind>/), equal to the one the run writes at its end had it ended
    there. One process, no DeepSpeed."""
    state = json.loads((ckpt / "state.json").read_text())
    stage = checkpoint_stage(ckpt)
    weights, ema = _weights(ckpt, stage, use_ema)
    if stage.kind == "unet":
        cfg = replace(cfg, diffusion=replace(cfg.diffusion, latent_scale=_latent_scale(cfg, state, run_dir)))
    model_cls = MODEL_KINDS[stage.kind][1]
    with torch.device("meta"):  # no random init of weights about to be replaced (seconds for the paper UNet)
        model = model_cls(getattr(cfg, stage.model_key))
    model.load_state_dict(weights, strict=True, assign=True)
    out = out or run_dir / EXPORT_DIR / step_dir_name(state["step"]) / stage.kind
    # Written beside and renamed: a run killed mid-export leaves no half export under the final name.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_export(model, stage_record(cfg, stage.kind, state["step"], ema), tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"exported the {'EMA ' if ema else ''}{stage.kind} of step {state['step']} to {out}", flush=True)
    return out


def export_after_checkpoint(run_dir: Path, ckpt: Path, step: int, run_cfg, info: DistInfo,
                            stopping: bool) -> Path | None:
    """trainer.export_every: rank 0 exports the checkpoint just saved when its step is a multiple
    (the last step's export is the end of the run's, export/<kind>), and the one saved on a stop
    signal when the grace period has room for it. Rank 0 alone reads the checkpoint from disk:
    nothing collective, the other ranks go on (or exit) meanwhile. run_cfg: the stage's config."""
    cfg: TrainerConfig = run_cfg.trainer
    if not info.is_main or cfg.export_every == 0:
        return None
    if not stopping and (step % cfg.export_every or step == cfg.max_steps):
        return None
    later = f"make it later with: python -m train.export {run_dir} --step {step}"
    if stopping:
        # The export reads and writes one model's weights, a fraction of what the save wrote
        # (every engine's weights and Adam moments, and the EMA): with half of the
        # grace period left it fits; with less, SIGKILL could cut the export and the exit short.
        save_s = json.loads((ckpt / "state.json").read_text()).get("save_s", 0.0)
        if save_s > cfg.grace_s / 2:
            log.warning("export of the stop checkpoint skipped: its save took %.1f s of trainer.grace_s=%g; %s",
                        save_s, cfg.grace_s, later)
            return None
    try:
        return export_checkpoint(run_dir, ckpt, run_cfg)
    except Exception:  # a side product: a failed export must not end a long run, but it is reported
        log.exception("export of step %d failed; %s", step, later)
        return None
