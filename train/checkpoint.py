"""Checkpoints: atomic, resumable exactly, and portable to another world size.

Layout under runs/<name>/checkpoints/:
  step_0000100/
    <engine>/            DeepSpeed checkpoint of each engine (exact resume at the same world size)
    portable/<engine>.safetensors, <engine>.optim.safetensors
                         full fp32 weights and Adam moments, gathered from all ranks (any world size)
    ema.safetensors      EMA weights when enabled
    rank00000.pt         per-rank RNG states and data-loader position (weights_only loadable)
    state.json           step, world size, engines, optimizer step counts
  latest                 name of the newest complete checkpoint

A checkpoint is written to step_XXXXXXX.tmp and renamed after every rank finished; `latest` is
replaced atomically after that, so a crash mid-save leaves `latest` on the previous checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from train.dist import DistInfo

log = logging.getLogger("train.checkpoint")
FAULT_ENV = "INFD_FAULT_INJECT"  # testing hook: "crash_in_checkpoint_save:STEP"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": np_state[2], "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _maybe_crash(step: int, point: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{point}:{step}":
        log.error("fault injection: crashing at %s, step %d", point, step)
        os._exit(13)


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (ZeRO 1/2) or the engine's own (ZeRO 0)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _is_partitioned(param) -> bool:
    # Every rank must take the same branch: the gathers below are collectives. `_hp_mapping` exists
    # on all ranks under ZeRO 1/2 (None where a rank holds no fragment of the parameter).
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def portable_state(engine) -> tuple[dict, dict]:
    """Full fp32 weights and Adam moments of an engine, by parameter name (collective: all ranks call)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, moments = {}, {}
    base = _base_optimizer(engine)
    if not base.state:  # never stepped (e.g. the discriminator before disc_start): zero moments
        _materialize_adam_state(engine, 0)
    for name, param in engine.module.named_parameters():
        partitioned = _is_partitioned(param)
        weights[name] = (safe_get_full_fp32_param(param) if partitioned else param).detach().float().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(param, key) if partitioned else base.state.get(param, {}).get(key)
            if value is not None:
                moments[f"{name}::{key}"] = value.detach().cpu().clone()
    return weights, moments


def optimizer_step_count(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def save_checkpoint(root: Path, step: int, engines: dict, extra_rank_state: dict, info: DistInfo,
                    keep_last: int, ema: dict | None = None, meta: dict | None = None,
                    grace_s: float | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    Its duration is logged and kept in state.json (`save_s`): a checkpoint taken on a stop
    signal must fit the grace period before SIGKILL (`grace_s`: warned when it does not)."""
    started = time.perf_counter()
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "portable").mkdir(parents=True)
    dist.barrier()
    counts = {}
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
        weights, moments = portable_state(engine)
        counts[name] = optimizer_step_count(engine)
        if info.is_main:
            save_file(weights, str(tmp / "portable" / f"{name}.safetensors"))
            save_file(moments, str(tmp / "portable" / f"{name}.optim.safetensors"))
        _maybe_crash(step, "crash_in_checkpoint_save")
    torch.save({"rng": rng_state(), **extra_rank_state}, tmp / f"rank{info.rank:05d}.pt")
    if info.is_main and ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    dist.barrier()
    if info.is_main:
        state = {"step": step, "world_size": info.world_size, "engines": list(engines),
                 "optimizer_steps": counts, "save_s": round(time.perf_counter() - started, 3), **(meta or {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        _prune(root, keep_last)
    dist.barrier()
    if info.is_main:
        seconds = time.perf_counter() - started
        log.info("saved checkpoint %s in %.1f s", final, seconds)
        if grace_s is not None and seconds > grace_s:
            log.warning("the checkpoint took %.1f s, longer than trainer.grace_s=%g: a stop signal's checkpoint "
                        "would be killed before it completes. "
                        "Raise the grace period (see docs/clusters.md, Preemption) "
                        "and trainer.grace_s with it.", seconds, grace_s)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, engines: dict, info: DistInfo) -> dict:
    """Restore engines, RNG and this rank's extra state. Same world size: DeepSpeed's own
    checkpoint, exact. Another world size: the portable weights and moments, and no per-rank
    state (the data position is in state.json: the same on every rank).
    Returns {"step", "rank_state" or None, "state"}."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] == info.world_size:
        for name, engine in engines.items():
            engine.load_checkpoint(str(path), tag=name, load_module_strict=True)
        rank_state = torch.load(path / f"rank{info.rank:05d}.pt", weights_only=True)
        set_rng_state(rank_state.pop("rng"))
        return {"step": state["step"], "rank_state": rank_state, "state": state}
    log.warning("checkpoint was written by %d ranks, this run has %d: loading the portable weights and "
                "optimizer moments; the data continues at the same global sample", state["world_size"], info.world_size)
    for name, engine in engines.items():
        load_portable(engine, path / "portable", name, state["optimizer_steps"][name])
    return {"step": state["step"], "rank_state": None, "state": state}


def load_portable(engine, directory: Path, name: str, optimizer_steps: int) -> None:
    """Set weights and Adam moments from full tensors; each rank keeps its own partition."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    weights = load_file(str(directory / f"{name}.safetensors"))
    moments = load_file(str(directory / f"{name}.optim.safetensors"))
    _materialize_adam_state(engine, optimizer_steps)
    base = _base_optimizer(engine)
    with torch.no_grad():
        for pname, param in engine.module.named_parameters():
            param.data.copy_(weights[pname].to(param.device, param.dtype))  # the module's own copy
            partitioned = _is_partitioned(param)
            if partitioned:
                safe_set_full_fp32_param(param, weights[pname].to(param.device))  # ZeRO's fp32 master
            for key in ("exp_avg", "exp_avg_sq"):
                value = moments.get(f"{pname}::{key}")
                if value is None:
                    continue
                if partitioned:
                    safe_set_full_optimizer_state(param, value.to(param.device), key)
                else:
                    base.state[param][key].copy_(value)


def _materialize_adam_state(engine, steps: int) -> None:
    """torch Adam creates its state at the first step; create it now (zeros) so that it can be
    filled in, and let ZeRO re-link its parameter fragments to it."""
    base = _base_optimizer(engine)
    for group in base.param_groups:
        for p in group["params"]:
            state = base.state[p]
            state["step"] = torch.tensor(float(steps))
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
