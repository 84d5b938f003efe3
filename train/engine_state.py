"""The DeepSpeed engines' part of a checkpoint: full fp32 weights, buffers and Adam moments by
name, each tensor written once by its owner rank (train/portable.py), with each engine's Adam step
count and LR schedule in state.json. Restoring re-partitions them for this run's world size and ZeRO
stage, so one format serves the same world size (exactly) and any other. Checkpoints of earlier
versions (DeepSpeed's own files and one portable file per engine) still load.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from train.dist import DistInfo
from train.portable import TensorIndex, assign_owners, shard_name

log = logging.getLogger("train.checkpoint")
MOMENTS = ("exp_avg", "exp_avg_sq")


class EnginesPart:
    """engines: name -> DeepSpeed engine. state.json entries: "engines" (their names),
    "optimizer_steps" (each engine's Adam step count) and "schedules" (each one's LR schedule state)."""

    def __init__(self, engines: dict):
        self.engines = engines

    def save(self, writer, info: DistInfo) -> dict:
        counts, schedules = {}, {}
        for name, engine in self.engines.items():
            weights, moments = portable_state(engine, info)  # collective
            directory = f"portable/{name}"
            writer.tensors(f"{directory}/{shard_name('weights', info.rank, info.world_size)}", weights)
            writer.tensors(f"{directory}/{shard_name('moments', info.rank, info.world_size)}", moments)
            counts[name] = optimizer_step_count(engine)
            schedules[name] = schedule_state(engine)
        return {"engines": list(self.engines), "optimizer_steps": counts, "schedules": schedules}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        if state.get("layout", 1) == 1 and state["world_size"] == info.world_size:
            for name, engine in self.engines.items():  # an earlier version's checkpoint: DeepSpeed's files
                engine.load_checkpoint(str(path), tag=name, load_module_strict=True)
            return
        if state["world_size"] != info.world_size:
            log.warning("checkpoint was written by %d ranks, this run has %d: weights and Adam moments are "
                        "re-partitioned; the data continues at the same global sample", state["world_size"],
                        info.world_size)
        for name, engine in self.engines.items():
            load_portable(engine, path, name, state["optimizer_steps"][name])
            load_schedule(engine, state.get("schedules", {}).get(name))


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (ZeRO 1/2) or the engine's own (ZeRO 0)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _is_partitioned(param) -> bool:
    # Every rank must take the same branch: the gathers below are collectives. `_hp_mapping` exists
    # on all ranks under ZeRO 1/2 (None where a rank holds no fragment of the parameter).
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def portable_state(engine, info: DistInfo) -> tuple[dict, dict]:
    """(weights and buffers, Adam moments) this rank owns, as full fp32 tensors by name, on the engine's
    device and possibly the live ones (the CheckpointWriter copies them to the host).
    A parameter that ZeRO-1/2 keeps whole in one rank's partition is owned by that rank and taken from
    its partition as it is (no copy on a CPU, no collective); one split between ranks is gathered by
    every rank alike (collective) and kept by its owner."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    if not base.state:  # never stepped (e.g. the discriminator before disc_start): zero moments
        _materialize_adam_state(engine, 0)
    params = dict(engine.module.named_parameters())
    buffers = persistent_buffers(engine.module)
    whole = whole_partition_ranks(params, info)
    sizes = {n: 4 * _full_numel(t) for n, t in (params | buffers).items() if n not in whole}
    owners = assign_owners(sizes, info.world_size) | whole

    weights, moments = {}, {}
    for name, param in params.items():
        partitioned, mine = _is_partitioned(param), owners[name] == info.rank
        if name in whole:
            if mine:
                fragment = param._hp_mapping
                weights[name] = fragment.hp_fragment.view(param.shape)
                for key in MOMENTS:
                    moments[f"{name}::{key}"] = fragment.get_optim_state_fragment(key).view(param.shape)
            continue
        if partitioned or mine:  # a partitioned tensor is gathered by every rank alike
            full = safe_get_full_fp32_param(param) if partitioned else param
            if mine:
                weights[name] = full.detach().float()
        for key in MOMENTS:
            if partitioned:
                value = safe_get_full_optimizer_state(param, key)
            else:
                value = base.state.get(param, {}).get(key) if mine else None
            if mine and value is not None:
                moments[f"{name}::{key}"] = value.detach().float()
    for name, buf in buffers.items():
        if owners[name] == info.rank:
            weights[name] = buf.detach().float()
    return weights, moments


def whole_partition_ranks(params: dict, info: DistInfo) -> dict[str, int]:
    """name -> the rank whose ZeRO-1/2 partition holds the whole parameter (every other rank holds none
    of it); parameters split between ranks, ZeRO-3's and unpartitioned ones are left out. The same on
    every rank: one all_gather of each rank's fragment sizes. At scale this keeps a checkpoint from
    all-reducing every parameter over every rank: only the few that straddle a partition boundary are."""
    import torch.distributed as dist

    zero12 = [n for n, p in params.items() if hasattr(p, "_hp_mapping") and not hasattr(p, "ds_id")]
    local = [0 if params[n]._hp_mapping is None else params[n]._hp_mapping.lp_fragment_address.numel for n in zero12]
    table = [local]
    if info.world_size > 1:
        table = [None] * info.world_size
        dist.all_gather_object(table, local)
    out = {}
    for i, name in enumerate(zero12):
        holders = [r for r in range(info.world_size) if table[r][i] > 0]
        if len(holders) == 1 and table[holders[0]][i] == params[name].numel():
            out[name] = holders[0]
    return out


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state_dict holds (e.g. running statistics), by name."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _full_numel(t) -> int:
    shape = getattr(t, "ds_shape", None)  # ZeRO-3 keeps an empty local tensor and the full shape here
    return int(torch.Size(shape).numel()) if shape is not None else t.numel()


def schedule_state(engine) -> dict | None:
    """The LR schedule's state (JSON-ready; None without one): its step count and current rates."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None:
        return None
    return {"last_epoch": scheduler.last_epoch, "step_count": getattr(scheduler, "_step_count", 0),
            "last_lr": [float(x) for x in scheduler.get_last_lr()]}


def load_schedule(engine, state: dict | None) -> None:
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None or state is None:
        return
    scheduler.last_epoch, scheduler._step_count = state["last_epoch"], state["step_count"]
    scheduler._last_lr = list(state["last_lr"])
    for group, lr in zip(scheduler.optimizer.param_groups, state["last_lr"]):
        group["lr"] = lr


def optimizer_step_count(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def load_portable(engine, path: Path, name: str, optimizer_steps: int) -> None:
    """Set weights, buffers and Adam moments from the full tensors of checkpoint `path`, one tensor
    at a time; each rank keeps its own partition."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    weights, moments = TensorIndex(path, name, "weights"), TensorIndex(path, name, "moments")
    _materialize_adam_state(engine, optimizer_steps)
    base = _base_optimizer(engine)
    params = dict(engine.module.named_parameters())
    with torch.no_grad():
        for pname, param in params.items():
            full = weights.get(pname)
            if full is None:
                raise KeyError(f"checkpoint {path} has no weights for {name}.{pname}")
            _set_module_param(param, full)
            zero3, partitioned = hasattr(param, "ds_id"), _is_partitioned(param)
            if zero3:
                _set_zero3_fp32(param, full)
            elif partitioned:
                safe_set_full_fp32_param(param, full.to(param.device))  # ZeRO's fp32 master
            for key in MOMENTS:
                value = moments.get(f"{pname}::{key}")
                if value is None:
                    continue
                if zero3:
                    _set_zero3_fp32(param, value, key)
                elif partitioned:
                    safe_set_full_optimizer_state(param, value.to(param.device), key)
                else:
                    base.state[param][key].copy_(value)
        for bname, buf in persistent_buffers(engine.module).items():
            value = weights.get(bname)
            if value is not None:  # checkpoints of earlier versions hold no buffers
                buf.copy_(value.to(buf.device, buf.dtype))


def _set_module_param(param, full: torch.Tensor) -> None:
    """The module's own copy of a parameter: whole, or under ZeRO-3 this rank's slice of it (its
    partition `ds_tensor`; the fp32 master is set separately)."""
    if not hasattr(param, "ds_id"):
        param.data.copy_(full.to(param.device, param.dtype))
        return
    import torch.distributed as dist

    _copy_rank_slice(param.ds_tensor, full, dist.get_rank(group=param.ds_process_group))


def _set_zero3_fp32(param, full: torch.Tensor, key: str | None = None) -> None:
    """ZeRO-3's fp32 master (key None) or Adam moment `key` of a parameter: this rank's slice.
    DeepSpeed's own set_full_hp_param reads past the end of a tensor whose size the ranks do not divide
    (a 3-element bias on 2 ranks: "start (2) + length (2) exceeds dimension size (3)")."""
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    _copy_rank_slice(part, full, optimizer._get_param_partition_rank(param))


def _copy_rank_slice(part: torch.Tensor, full: torch.Tensor, rank: int) -> None:
    """Rank `rank`'s partition of the flattened `full`: equal slices, the last ones padded at the end."""
    flat = full.flatten().to(part.device, part.dtype)
    start = part.numel() * rank
    count = max(0, min(part.numel(), flat.numel() - start))
    part.data.view(-1)[:count].copy_(flat[start:start + count])


def _materialize_adam_state(engine, steps: int) -> None:
    """torch Adam creates its state at the first step; create it now (zeros) so that it can be
    filled in, and let ZeRO re-link its parameter fragments to it."""
    base = _base_optimizer(engine)
    params = [p for group in base.param_groups for p in group["params"]]
    # ZeRO-3 steps its fp32 sub-groups one at a time, each swapped into the param group for its step: the
    # state is keyed by those tensors, which are not in param_groups between steps.
    params += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
    for p in params:
        state = base.state[p]
        state["step"] = torch.tensor(float(steps))
        state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
        state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
