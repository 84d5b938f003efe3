"""The DeepSpeed engines' part of a checkpoint: DeepSpeed's own files (exact at the same world
size) and a portable copy (full fp32 weights and Adam moments by parameter name) that any world
size and ZeRO stage can load, and that train.export reads without DeepSpeed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from train.dist import DistInfo

log = logging.getLogger("train.checkpoint")


class EnginesPart:
    """engines: name -> DeepSpeed engine. state.json entries: "engines" (their names) and
    "optimizer_steps" (each engine's Adam step count, for the portable path)."""

    def __init__(self, engines: dict):
        self.engines = engines

    def save(self, writer, info: DistInfo) -> dict:
        counts = {}
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(writer.directory), tag=name, save_latest=False)  # collective
            weights, moments = portable_state(engine)  # collective
            counts[name] = optimizer_step_count(engine)
            if info.is_main:
                writer.tensors(f"portable/{name}.safetensors", weights)
                writer.tensors(f"portable/{name}.optim.safetensors", moments)
        return {"engines": list(self.engines), "optimizer_steps": counts}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        """Same world size: DeepSpeed's own checkpoint, exact. Another: the portable weights and moments."""
        if state["world_size"] == info.world_size:
            for name, engine in self.engines.items():
                engine.load_checkpoint(str(path), tag=name, load_module_strict=True)
            return
        log.warning("checkpoint was written by %d ranks, this run has %d: loading the portable weights and "
                    "optimizer moments; the data continues at the same global sample", state["world_size"],
                    info.world_size)
        for name, engine in self.engines.items():
            load_portable(engine, path / "portable", name, state["optimizer_steps"][name])


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
