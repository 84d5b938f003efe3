"""Writing a checkpoint's files: now (a stop signal, the last step) or in the background (periodic).

The parts hand their files to a `CheckpointWriter` while every rank is at the same step boundary;
nothing is written then. `write()` writes them, each file fsynced. A background save first takes a
snapshot (host copies of the tensors that training will change) and then writes from a thread
while training goes on; each rank marks its files done (`.done-rankNNNNN`) and rank 0's thread,
once it sees every rank's mark, publishes the checkpoint (`commit`). No collective runs off the
main thread: the ranks meet only through the files, so the training's collectives are never
interleaved with the checkpoint's.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from infd.utils.daemon import start_daemon

from train.durable import fsync_path, write_bytes, write_safetensors

log = logging.getLogger("train.checkpoint")
FAULT_ENV = "INFD_FAULT_INJECT"  # testing hooks: "crash_in_checkpoint_save:STEP", "hold_background_save:STEP"
MARK = ".done-rank{:05d}"
FAILED = ".failed-rank{:05d}"
# A rank's files (a handful: weights, moments, EMA, small state) are written at once: on the development
# machine three files at once took 2.8 s where one after another took 6.8 s and the disk's one-stream probe
# 8.8 s (4.6 GB, medians of 3).


class SnapshotPool:
    """Host buffers a background save copies the live tensors into, kept from one save to the next:
    copying the paper UNet's 4.6 GB into new tensors spends most of its time faulting in their pages
    (0.6-0.7 s on the development machine against 0.2 s into buffers used before). Pinned where there
    is a GPU (faster copies from the device). Reusing them is safe because saves never overlap: a save
    starts only after the previous one has written its files."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def copy(self, key: str, t: Tensor) -> Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
        return buf.copy_(t.detach())


@dataclass
class CheckpointWriter:
    """Where parts put their files. snapshot: the files are written later, while training changes
    the live tensors: take host copies now (into `pool`'s buffers, which the Checkpointer keeps from
    one save to the next). eager (a synchronous save): each file starts writing as soon as it is handed
    over, so the EMA's file is on its way to the disk while the engines gather theirs."""

    directory: Path
    snapshot: bool = False
    eager: bool = False
    pool: SnapshotPool = field(default_factory=SnapshotPool)  # where a snapshot's copies go
    files: list = field(default_factory=list)  # (relative name, dict of tensors | torch object)
    writing: list = field(default_factory=list)  # futures of the files started (eager)

    def tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Tensors on any device, the live ones included: they reach the file as they are now."""
        if self.snapshot:
            self._add(name, {k: self.pool.copy(f"{name}/{k}", v) for k, v in tensors.items()})
        else:
            self._add(name, {k: v.detach().to("cpu") for k, v in tensors.items()})

    def torch_object(self, name: str, obj) -> None:
        self._add(name, obj)

    def _add(self, name: str, payload) -> None:
        self.files.append((name, payload))
        if self.eager:
            self.writing.append(self._start(name, payload))

    def _start(self, name: str, payload):
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return start_daemon(lambda: _write_file(path, payload), "checkpoint-file")

    def write(self, step: int) -> int:
        """Write every file at once (or wait for those already started), each fsynced; returns the bytes of
        tensors written. A file's error is raised once all have ended."""
        futures = self.writing if self.eager else [self._start(name, payload) for name, payload in self.files]
        if futures:
            wait(futures, return_when=FIRST_COMPLETED)
            _maybe_hold(step)
        wait(futures)
        return sum(f.result() for f in futures)


def _write_file(path: Path, payload) -> int:
    if isinstance(payload, dict) and all(isinstance(v, Tensor) for v in payload.values()):
        return write_safetensors(path, payload)
    torch.save(payload, path)
    fsync_path(path)
    return 0


def mark_done(directory: Path, rank: int, failed: bool = False) -> None:
    """This rank's files are written (or, failed, will not be: rank 0 stops waiting for them)."""
    write_bytes(directory / (FAILED if failed else MARK).format(rank), b"")


def wait_for_marks(directory: Path, world_size: int, timeout_s: float) -> str:
    """"done" once every rank marked its files done; "failed" as soon as one rank marked a failure;
    "timeout" after timeout_s (a rank died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if any((directory / FAILED.format(r)).exists() for r in range(world_size)):
            return "failed"
        if all((directory / MARK.format(r)).exists() for r in range(world_size)):
            return "done"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.05)


def clear_marks(directory: Path, world_size: int) -> None:
    for r in range(world_size):
        (directory / MARK.format(r)).unlink(missing_ok=True)


class BackgroundSave:
    """One checkpoint being written by a daemon thread (a crashed run does not wait for it, and its
    `.tmp` directory is never published). `wait()` returns when it is done, publishing included on
    rank 0; a failed save (a full disk, say) is logged there and leaves `latest` where it was: the
    run goes on and the next save tries again."""

    def __init__(self, step: int, work: Callable[[], None]):
        self.step, self.error = step, None
        self.thread = threading.Thread(target=self._run, args=(work,), name=f"checkpoint-{step}", daemon=True)
        self.thread.start()

    def _run(self, work) -> None:
        try:
            work()
        except Exception as err:  # reported by wait(), on the main thread
            self.error = err

    def wait(self) -> bool:
        """True if this rank's part of the save succeeded (published too, on rank 0)."""
        self.thread.join()
        if self.error is not None:
            log.error("the background checkpoint of step %d failed and is not published (the previous one stays "
                      "`latest`; the next save tries again)", self.step, exc_info=self.error)
        return self.error is None


def maybe_crash(step: int, point: str) -> None:
    if os.environ.get(FAULT_ENV, "") == f"{point}:{step}":
        log.error("fault injection: crashing at %s, step %d", point, step)
        os._exit(13)


def _maybe_hold(step: int) -> None:
    """Fault injection: the writer stops for good after its first file (a test kills the process then)."""
    if os.environ.get(FAULT_ENV, "") == f"hold_background_save:{step}" and threading.current_thread().daemon:
        log.error("fault injection: holding the background save of step %d", step)
        threading.Event().wait()
