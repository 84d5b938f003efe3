"""Checkpoints: one protocol for every piece of a run's state; atomic, exact, portable.

Layout under runs/<name>/checkpoints/:
  step_0000100/
    <engine>/            DeepSpeed checkpoint of each engine (exact resume at the same world size)
    portable/<engine>.safetensors, <engine>.optim.safetensors
                         full fp32 weights and Adam moments, gathered from all ranks (any world size)
    ema.safetensors      EMA weights when enabled
    rank00000.pt         per-rank RNG states (weights_only loadable)
    state.json           step, world size, save time, and each part's entries: the engines and their
                         optimizer step counts, the data position (a global sample count, the same on
                         every rank and valid at any world size), the task's own state ("task")
  latest                 name of the newest complete checkpoint

A run's state is a list of parts (as torchtitan's checkpointer gathers Stateful objects): the
engines (train/engine_state.py), the EMA, the data position, the task's state (e.g. the
diffusion stage's latent scale) and the RNG. Each part saves itself through a `CheckpointWriter`
and returns its state.json entries, and restores itself from the directory and state.json. The
`Checkpointer` gathers them: it writes step_XXXXXXX.tmp, renames it after every rank finished and
then replaces `latest` atomically, so a crash mid-save leaves `latest` on the previous checkpoint.
Checkpoints of older versions are read through infd.compat.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from infd.compat import checkpoint_data_position, checkpoint_task_state
from train.dist import DistInfo

log = logging.getLogger("train.checkpoint")
FAULT_ENV = "INFD_FAULT_INJECT"  # testing hook: "crash_in_checkpoint_save:STEP"


class CheckpointWriter:
    """Where parts write their files: `directory`, synchronously. A single-copy or asynchronous
    writer replaces it by offering the same methods; `finish` returns once every file is durable."""

    def __init__(self, directory: Path):
        self.directory = directory

    def tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))

    def torch_object(self, name: str, obj) -> None:
        torch.save(obj, self.directory / name)

    def finish(self) -> None:
        """Nothing to wait for: every write above has returned."""


class CheckpointPart(Protocol):
    """A piece of a run's state."""

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        """Write its files (collective: every rank calls it); return its state.json entries (rank 0's are kept)."""

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        """Restore itself from checkpoint `path` and its state.json `state`, at this run's world size."""


class EmaPart:
    """The EMA of the exported model (None: the run keeps none)."""

    def __init__(self, ema):
        self.ema = ema

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        if self.ema is not None and info.is_main:
            writer.tensors("ema.safetensors", self.ema.state_dict())
        return {}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        if self.ema is not None and (path / "ema.safetensors").exists():
            self.ema.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(info.device)))


class DataPart:
    """The loader's position: the global sample count after the last batch trained on."""

    def __init__(self, loader, grad_accum: int):
        self.loader, self.grad_accum = loader, grad_accum

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        return {"data": self.loader.state_dict()}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        self.loader.load_state_dict(checkpoint_data_position(state, self.grad_accum))


class TaskPart:
    """The stage's own state (task.state_dict(): e.g. the latent scale the UNet trains with)."""

    def __init__(self, task):
        self.task = task

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        return {"task": self.task.state_dict()}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        self.task.load_state_dict(checkpoint_task_state(state))


class RngPart:
    """Each rank's RNG states; restored at the same world size only (another has other streams)."""

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        writer.torch_object(f"rank{info.rank:05d}.pt", {"rng": rng_state()})
        return {}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        if state["world_size"] == info.world_size:
            set_rng_state(torch.load(path / f"rank{info.rank:05d}.pt", weights_only=True)["rng"])


class Checkpointer:
    """Saves and restores `parts` (in that order) under `root`; keeps the last `keep_last`."""

    def __init__(self, root: Path, parts: list[CheckpointPart], info: DistInfo, keep_last: int,
                 grace_s: float | None = None):
        self.root, self.parts, self.info, self.keep_last, self.grace_s = root, parts, info, keep_last, grace_s

    def save(self, step: int) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory.

        Its duration is logged and kept in state.json (`save_s`): a checkpoint taken on a stop
        signal must fit the grace period before SIGKILL (`grace_s`: warned when it does not)."""
        started, info = time.perf_counter(), self.info
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        writer, entries = CheckpointWriter(tmp), {}
        for part in self.parts:
            entries |= part.save(writer, info)
            _maybe_crash(step, "crash_in_checkpoint_save")
        writer.finish()
        dist.barrier()
        if info.is_main:
            state = {"step": step, "world_size": info.world_size, **entries,
                     "save_s": round(time.perf_counter() - started, 3)}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / "latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / "latest")
            _prune(self.root, self.keep_last)
        dist.barrier()
        if info.is_main:
            self._report(final, time.perf_counter() - started)
        return final

    def _report(self, final: Path, seconds: float) -> None:
        log.info("saved checkpoint %s in %.1f s", final, seconds)
        if self.grace_s is not None and seconds > self.grace_s:
            log.warning("the checkpoint took %.1f s, longer than trainer.grace_s=%g: a stop signal's checkpoint "
                        "would be killed before it completes. Raise the grace period (see docs/clusters.md, "
                        "Preemption) and trainer.grace_s with it.", seconds, self.grace_s)

    def load(self, path: Path) -> int:
        """Restore every part from checkpoint `path`; returns its step."""
        state = json.loads((path / "state.json").read_text())
        for part in self.parts:
            part.load(path, state, self.info)
        return state["step"]


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


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
