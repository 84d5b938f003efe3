"""The training loop shared by both stages: steps, logging, images, checkpoints, preemption, resume.

A stage hands over a `Task` (its engines and what one step does) and its data `Loader`; the loop
does the rest, the same way for both.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from train.checkpoint import Checkpointer, DataPart, EmaPart, RngPart, TaskPart, latest_checkpoint, step_dir_name
from train.config import TrainerConfig
from infd.data.loader import Loader
from infd.eval.real_set import EvaluationStopped
from train.dist import DistInfo, any_rank, max_over_ranks
from train.engine_state import EnginesPart
from train.run_exports import export_after_checkpoint
from train.logger import Logger, Throughput, grad_norm
from infd.utils.signals import PreemptionFlag

log = logging.getLogger("train")


@dataclass(frozen=True)
class RunEnd:
    """How `train` ended: at trainer.max_steps, or early on a stop signal (the same on every rank)."""
    step: int  # the last completed step
    stop_signal: int | None = None  # the signal's number when a stop signal ended it early
    checkpoint: Path | None = None  # with a stop: the checkpoint holding `step` (None at step 0)


@dataclass
class StepOutput:
    logs: dict[str, float]  # global means, logged on rank 0
    draws: dict[str, list] = field(default_factory=dict)  # this rank's per-sample random draws (sample log)


class Task(Protocol):
    """What a stage gives the loop."""

    cfg: object  # the stage's config (its trainer section drives the loop; exports are rebuilt from it)
    engines: dict  # name -> DeepSpeed engine: checkpointed, their lr and grad norm logged
    ema: object | None  # EMA of the exported model, checkpointed; None without

    def train_step(self, micro_batches: list, step: int) -> StepOutput:
        """One optimizer step over the micro-batches (gradient accumulation); `step` counts
        completed steps (0 for the first)."""

    def image_panels(self, batch: dict) -> dict:
        """W&B panels (name -> images or (images, captions)); collective (every rank renders)."""

    def export(self, run_dir: Path, step: int) -> Path | None:
        """Write the trained model to run_dir/export/; collective, rank 0 writes."""

    def state_dict(self) -> dict:
        """The task's own state for the checkpoint (JSON-ready; {} when it keeps none)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""

    def evaluate(self, should_stop: Callable[[], bool]) -> dict:
        """{"eval/<metric>": value} of the EMA model on rank 0 ({} elsewhere); collective.
        `should_stop()` (collective) is checked between its batches: True raises EvaluationStopped."""


def find_resume(cfg: TrainerConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(cfg.resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"trainer.resume={cfg.resume}: no complete checkpoint there (state.json missing)")
    return path


def checkpointer(task: Task, data: Loader, cfg: TrainerConfig, info: DistInfo, ckpt_root: Path,
                 grad_accum: int) -> Checkpointer:
    """Every piece of a run's state, gathered: saved and restored in this order (the RNG last; the EMA
    first: a stop checkpoint writes its file while the engines gather their ZeRO partitions)."""
    parts = [EmaPart(task.ema), EnginesPart(task.engines), DataPart(data, grad_accum), TaskPart(task), RngPart()]
    return Checkpointer(ckpt_root, parts, info, cfg.keep_last, grace_s=cfg.grace_s)


def resume(saver: Checkpointer, cfg: TrainerConfig) -> int:
    path = find_resume(cfg, saver.root)
    if path is None:
        return 0
    step = saver.load(path)
    log.info("resumed from %s at step %d", path, step)
    return step


class StepLog:
    """A JSON-lines file with one line per step, cut back to the resumed step on restart, so that
    after any number of restarts it holds each step once. Lines a killed process left half
    written are dropped."""

    def __init__(self, path: Path, enabled: bool, start_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and path.exists():
            keep = [line for line in path.read_text().splitlines() if _step_of(line, start_step + 1) <= start_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, values: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def _step_of(line: str, default: int) -> int:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return default


def train(task: Task, data: Loader, cfg: TrainerConfig, info: DistInfo, run_dir: Path, logger: Logger, grad_accum: int,
          preempt: PreemptionFlag) -> RunEnd:
    """Run until trainer.max_steps or until `preempt` is raised (on any rank).

    The stop check comes after each step's data fetch, in one all-reduce, so that every rank
    stops at the same step boundary: a signal during step N (or during the fetch for step N+1)
    ends in a checkpoint of step N+1 (or N) holding the data position before that fetch."""
    ckpt_root = run_dir / "checkpoints"
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    saver = checkpointer(task, data, cfg, info, ckpt_root, grad_accum)
    step = resume(saver, cfg)
    metrics = StepLog(run_dir / "metrics.jsonl", info.is_main, step)
    # Which samples each rank trained on, per step: audits that restarts lose and repeat nothing.
    samples = StepLog(run_dir / "samples" / f"rank{info.rank:05d}.jsonl", cfg.sample_log, step)
    batches, meter, saved = iter(data), Throughput(), step

    def checkpoint(stopping: bool = False) -> None:
        # Periodic saves write in the background; a stop signal's and the last step's are written
        # before the call returns (and wait for a background one first: never two in flight).
        last = stopping or step == cfg.max_steps
        path = saver.save(step, background=cfg.ckpt_async and not last)
        if cfg.export_every and step % cfg.export_every == 0:
            saver.wait()  # the export reads the published checkpoint
        export_after_checkpoint(run_dir, path, step, task.cfg, info, stopping)  # trainer.export_every; rank 0

    try:
        while step < cfg.max_steps:
            position, start = data.state_dict(), time.perf_counter()
            micro = fetch_micro_batches(batches, grad_accum, preempt)
            if any_rank(micro is None or preempt.raised, info.device):
                # A background save of this very step is published before the process ends; if it failed,
                # the stop checkpoint is written now instead.
                if step > saved or any_rank(not saver.wait(), info.device):
                    data.load_state_dict(position)  # the batches fetched after step `step` were not trained on
                    checkpoint(stopping=True)
                log.warning("stopped by signal at step %d (%s)", step,
                            "checkpoint saved" if step else "before the first step: nothing to save")
                # Ranks the signal did not reach stop too: they learn which signal it was here.
                signum = max_over_ranks(preempt.signum or 0, info.device) or None
                return RunEnd(step, signum, ckpt_root / step_dir_name(step) if step else None)
            meter.data_wait(time.perf_counter() - start, sum(len(b) for b in micro))
            out = task.train_step(micro, step)
            step += 1
            logger.step_done(step)
            evals = evaluate(task, step, preempt, info) if cfg.eval_every and step % cfg.eval_every == 0 else {}
            stopping = evals is None  # the same on every rank: go straight to the checkpoint
            evals = evals or {}
            metrics.write(step, out.logs | evals)
            if evals:
                logger.log_scalars(evals, step)
            if samples.enabled:
                samples.write(step, {"keys": [k for b in micro for k in b.keys]} | out.draws)
            if step % cfg.log_every == 0:
                skips = data.skip_counts()  # this rank's workers; data errors are rare, no all-reduce
                logger.log_scalars(out.logs | _engine_scalars(task.engines) | meter.read(info.world_size) |
                                   {f"data/skipped/{k}": v for k, v in skips.items()} |
                                   {"data/skipped_total": sum(skips.values()),
                                    "data/read_mb": data.bytes_read() / 2**20,
                                    "data/hedged_reads": data.hedges_fired(),
                                    "data/cache_evicted": data.cache_evictions()}, step)
            if step % cfg.image_every == 0 and not stopping:
                logger.log_images(task.image_panels(micro[0]), step)  # every rank renders (ZeRO-3 gathers); rank 0 logs
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                checkpoint()
                saved = step
    finally:
        batches.close()  # ends the DataLoader iterator: its workers are stopped here, not left to exit
    saver.wait()
    task.export(run_dir, step)  # collective; the task writes on rank 0
    return RunEnd(step)


def evaluate(task: Task, step: int, preempt: PreemptionFlag, info: DistInfo) -> dict | None:
    """task.evaluate, or None if a stop signal abandoned it (the flag is all-reduced before each
    round of its batches, so every rank abandons it at the same point): an evaluation never holds
    up the checkpoint that the signal asks for. Not skipped on a local flag: ranks would part ways."""
    log.info("evaluating at step %d", step)
    try:
        return task.evaluate(lambda: any_rank(preempt.raised, info.device))
    except EvaluationStopped:
        log.warning("evaluation stopped by the stop signal: nothing logged for it")
        return None


def fetch_micro_batches(batches: Iterator, n: int, preempt: PreemptionFlag) -> list | None:
    """The next step's micro-batches, or None when a stop is pending: none are fetched after the
    signal, and a data worker that died anyway then does not take the checkpoint down with it."""
    if preempt.raised:
        return None
    try:
        return [next(batches) for _ in range(n)]
    except Exception:
        if not preempt.raised:
            raise
        log.warning("the data loader failed after the stop signal; checkpointing the last completed step",
                    exc_info=True)
        return None


def _engine_scalars(engines: dict) -> dict:
    out = {}
    for name, engine in engines.items():
        out[f"lr/{name}"] = engine.get_lr()[0]
        norm = grad_norm(engine)
        if norm is not None:
            out[f"grad_norm/{name}"] = norm
    return out
