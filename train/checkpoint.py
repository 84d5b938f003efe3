"""Checkpoints: one protocol for every piece of a run's state; atomic, exact at any world size,
each tensor written once.

Layout under runs/<name>/checkpoints/:
  step_0000100/
    portable/<engine>/weights-rankRRRRR-of-WWWWW.safetensors, moments-...
                         full fp32 weights (and buffers) and Adam moments by name, each tensor written
                         once by the rank that owns it (train/portable.py): any world size, any ZeRO
                         stage and train.export read them; the ranks write their files in parallel
    ema/ema-rankRRRRR-of-WWWWW.safetensors
                         EMA weights when enabled, shared out the same way
    rank00000.pt         per-rank RNG states (weights_only loadable; restored at the same world size)
    state.json           step, world size, layout, save time, and each part's entries: the engines with
                         their optimizer step counts and LR schedules, the data position (a global
                         sample count, valid at any world size), the task's own state ("task")
  latest                 name of the newest complete checkpoint

About 16 bytes per trained parameter with an EMA (4 weights + 8 Adam moments + 4 EMA), 12 without:
DeepSpeed's own files, which repeated the weights and moments, are no longer written (checkpoints
of earlier versions that hold them still load).

A run's state is a list of parts (as torchtitan's checkpointer gathers Stateful objects): the
engines (train/engine_state.py), the EMA, the data position, the task's state (e.g. the
diffusion stage's latent scale) and the RNG. Each part hands its files to a `CheckpointWriter`
and returns its state.json entries, and restores itself from the directory and state.json. The
`Checkpointer` gathers them into step_XXXXXXX.tmp, every file fsynced; once every rank's files are
written, rank 0 writes state.json, renames the directory and then replaces `latest`, each rename
synced, so a crash mid-save leaves `latest` on the previous checkpoint. A periodic save can run
in the background (train/checkpoint_writer.py): the call returns after the snapshot, and the next
save, a stop signal's or the last step's, first waits for it: never two in flight.
Checkpoints of older versions are read through infd.compat and train/portable.py.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from infd.compat import checkpoint_data_position, checkpoint_task_state
from train.checkpoint_writer import (BackgroundSave, CheckpointWriter, SnapshotPool, clear_marks, mark_done,
                                     maybe_crash, wait_for_marks)
from train.dist import DistInfo
from train.durable import fsync_path, replace_durably, write_bytes
from train.portable import EMA, assign_owners, read_ema, shard_name

log = logging.getLogger("train.checkpoint")
LAYOUT = 2  # state.json "layout": 2 = portable tensors only, sharded by owner; absent = DeepSpeed files + copies
MARK_TIMEOUT_S = 1800.0  # rank 0 gives up publishing a background save whose other ranks never finished


class CheckpointPart(Protocol):
    """A piece of a run's state."""

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        """Write its files (collective: every rank calls it); return its state.json entries (rank 0's are kept)."""

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        """Restore itself from checkpoint `path` and its state.json `state`, at this run's world size."""


class EmaPart:
    """The EMA of the exported model (None: the run keeps none), shared out over the ranks' files."""

    def __init__(self, ema):
        self.ema = ema

    def save(self, writer: CheckpointWriter, info: DistInfo) -> dict:
        if self.ema is not None:
            shadow = self.ema.state_dict()
            owners = assign_owners({k: v.numel() * v.element_size() for k, v in shadow.items()}, info.world_size)
            mine = {k: v for k, v in shadow.items() if owners[k] == info.rank}
            writer.tensors(f"{EMA}/{shard_name(EMA, info.rank, info.world_size)}", mine)
        return {}

    def load(self, path: Path, state: dict, info: DistInfo) -> None:
        if self.ema is not None:
            tensors = read_ema(path)
            if tensors is not None:
                self.ema.load_state_dict({k: v.to(info.device) for k, v in tensors.items()})


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
        self.pending: BackgroundSave | None = None
        self.pool = SnapshotPool()  # a background save's host copies, reused by the next one

    def save(self, step: int, background: bool = False) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory it publishes.

        background: return once the snapshot is taken; the files are written and published while
        training goes on (`wait()`). Its duration (both parts) is logged and kept in state.json
        (`save_s`; `write_s` the part rank 0 spent writing its files): a checkpoint taken on a stop
        signal must fit the grace period before SIGKILL
        (`grace_s`: warned when it does not)."""
        self.wait()  # never two in flight
        started, info = time.perf_counter(), self.info
        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        writer, entries = CheckpointWriter(tmp, snapshot=background, eager=not background, pool=self.pool), {}
        for part in self.parts:
            entries |= part.save(writer, info)
            maybe_crash(step, "crash_in_checkpoint_save")
        state = {"step": step, "world_size": info.world_size, "layout": LAYOUT, **entries}
        if background:
            blocking_s = time.perf_counter() - started
            self.pending = BackgroundSave(step, lambda: self._finish_in_background(writer, state, started, blocking_s))
            return final
        write_started = time.perf_counter()
        writer.write(step)
        write_s = time.perf_counter() - write_started
        dist.barrier()
        if info.is_main:
            self._publish(tmp, state | {"save_s": round(time.perf_counter() - started, 3),
                                        "write_s": round(write_s, 3)})
        dist.barrier()
        return final

    def wait(self) -> bool:
        """Return once the background save (if any) is written and, on rank 0, published; False if it
        failed (logged; `latest` stays on the checkpoint before it)."""
        if self.pending is None:
            return True
        pending, self.pending = self.pending, None
        return pending.wait()

    def _finish_in_background(self, writer: CheckpointWriter, state: dict, started: float, blocking_s: float) -> None:
        info, step = self.info, state["step"]
        try:
            write_started = time.perf_counter()
            writer.write(step)
            write_s = time.perf_counter() - write_started
        except Exception:
            mark_done(writer.directory, info.rank, failed=True)  # rank 0 stops waiting for this rank's files
            raise
        mark_done(writer.directory, info.rank)
        if not info.is_main:
            return
        outcome = wait_for_marks(writer.directory, info.world_size, MARK_TIMEOUT_S)
        if outcome != "done":
            raise RuntimeError(f"checkpoint of step {step} not published: " + (
                "a rank failed to write its files" if outcome == "failed" else
                f"not every rank finished writing its files within {MARK_TIMEOUT_S:.0f} s"))
        clear_marks(writer.directory, info.world_size)
        self._publish(writer.directory, state | {"save_s": round(time.perf_counter() - started, 3),
                                                 "blocking_s": round(blocking_s, 3), "write_s": round(write_s, 3)})

    def _publish(self, tmp: Path, state: dict) -> None:
        """Rank 0, once every rank's files are durable: state.json, the directory's name, `latest`."""
        final = tmp.with_name(tmp.name[:-len(".tmp")])
        write_bytes(tmp / "state.json", json.dumps(state, indent=1).encode())
        fsync_path(tmp)
        shutil.rmtree(final, ignore_errors=True)
        replace_durably(tmp, final)
        pointer = self.root / "latest.tmp"
        write_bytes(pointer, final.name.encode())
        replace_durably(pointer, self.root / "latest")
        _prune(self.root, self.keep_last, state["step"])
        self._report(final, state)

    def _report(self, final: Path, state: dict) -> None:
        seconds = state["save_s"]
        blocked = f" ({state['blocking_s']:.1f} s of it blocking training)" if "blocking_s" in state else ""
        log.info("saved checkpoint %s in %.1f s%s", final, seconds, blocked)
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


def _prune(root: Path, keep_last: int, published: int) -> None:
    """Keep the newest `keep_last` checkpoints; drop the .tmp folders of saves older than the one just
    published (cut short by a crash)."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    stale = [p for p in root.glob("step_*.tmp") if int(p.name[5:12]) < published]
    for old in done[:-keep_last] + stale:
        shutil.rmtree(old, ignore_errors=True)
