"""Checks at start, before any model is built, so that a misconfigured job fails in seconds with
the setting to change rather than hours later (or hangs). Every rank runs them and all ranks
agree on the outcome (one all-gather): a failure stops the whole job, never one rank alone.

  run directory   writable from every rank, and one shared directory across nodes
  data            shards exist, S3 answers, an epoch has at least one batch on every rank
  checkpoint      the world size of the one to resume from, and what resuming at another means
  config          combinations that train but not as meant (restarts with resume=never, ...)
"""
from __future__ import annotations

from infd.config import ConfigError

import json
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch.distributed as dist

from train.dist import DistInfo, ranks_per_node
from train.portable import has_portable

log = logging.getLogger("train.preflight")


class PreflightError(RuntimeError):
    pass


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_run_dir(run_dir: Path, info: DistInfo, token: str, found: Findings) -> Path | None:
    """Each rank writes a probe file holding this job's token (so a probe left by an earlier job
    cannot pass for this one); returns the probe directory (None if this rank could not)."""
    probes = run_dir / ".preflight"
    try:
        probes.mkdir(parents=True, exist_ok=True)
        (probes / f"rank{info.rank:05d}").write_text(f"{token} {socket.gethostname()}")
        return probes
    except OSError as err:
        found.errors.append(f"run directory {run_dir} is not writable from {socket.gethostname()} "
                            f"(rank {info.rank}): {err}. Set run.root to storage every node can write.")
        return None


def _probe_token(path: Path) -> str:
    try:
        return path.read_text().split(" ", 1)[0]
    except OSError:
        return ""


def check_shared(probes: Path, info: DistInfo, token: str, found: Findings) -> None:
    """After every rank wrote its probe: rank 0 must see them all, or checkpoints would be split
    across machines that cannot read each other's parts."""
    missing = [r for r in range(info.world_size) if _probe_token(probes / f"rank{r:05d}") != token]
    if missing:
        found.errors.append(f"run directory {probes.parent} is not shared: rank 0 on {socket.gethostname()} "
                            f"cannot see the files of ranks {missing[:8]}. Checkpoints need one directory that "
                            "all nodes share: set run.root to a network filesystem path mounted on every node.")


def check_s3(url: str, key: str, found: Findings) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from infd.data.urls import s3_client, split_s3

    bucket, obj = split_s3(url)
    try:
        s3_client().head_object(Bucket=bucket, Key=obj)
    except (BotoCoreError, ClientError) as err:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS default")
        found.errors.append(f"{key}: cannot read {url} from S3 (endpoint {endpoint}): {err}. Check the bucket "
                            "and key, the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and AWS_ENDPOINT_URL.")


def check_data(loader, key: str, info: DistInfo, found: Findings) -> None:
    """loader: a DataConfig; key: its dotted name in the config, for the messages. The source
    itself lists the shards, reads the index and plans the epoch, exactly as training will."""
    from infd.data.loader import check_plan
    from infd.data.shard_source import ShardSource

    try:
        source = ShardSource(loader, None, None)
    except Exception as err:  # noqa: BLE001 (missing, unreachable or malformed: all reported the same way)
        where = " (S3: check the credentials and AWS_ENDPOINT_URL)" if "s3://" in str(loader.shards) else ""
        found.errors.append(f"{key}.shards / {key}.index: cannot read the shard index or list the shards{where}: "
                            f"{err}")
        return
    if source.urls[0].startswith("s3://"):
        check_s3(source.urls[0], f"{key}.shards", found)
    try:
        check_plan(source, loader, info.world_size, ranks_per_node(), key=key)
    except ConfigError as err:
        found.errors.append(str(err))
    if source.cache is not None:
        check_shard_cache(source.cache.options, key, found)


def check_shard_cache(options, key: str, found: Findings) -> None:
    """The node's shard cache folder: writable, and room for its bound (options: a CacheOptions)."""
    root = options.root
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError as err:
        found.errors.append(f"{key}.cache_dir: cannot create the shard cache folder {root}: {err}. Point "
                            f"{key}.cache_dir (or INFD_SHARD_CACHE) at a node-local disk")
        return
    held = sum(p.stat().st_size for p in root.glob("*/*") if p.name.isdigit())
    if free + held < options.limit_bytes:
        found.warnings.append(f"{key}.cache_gb={options.limit_bytes / 1e9:g}, but {root} has {free / 1e9:.1f} GB free "
                              f"(+{held / 1e9:.1f} GB cached): the disk fills before the cache reaches its bound; "
                              f"lower {key}.cache_gb or move {key}.cache_dir (docs/data.md sizes it)")


def check_resume(trainer, ckpt_root: Path, info: DistInfo, found: Findings) -> None:
    from train.loop import find_resume

    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and trainer.resume == "never":
        found.errors.append(f"trainer.resume=never under torchrun --max-restarts {restarts}: each restart would "
                            "train from step 0 again. Use trainer.resume=auto.")
    try:
        path = find_resume(trainer, ckpt_root)
    except FileNotFoundError as err:
        found.errors.append(str(err))
        return
    if path is None:
        return
    state = json.loads((path / "state.json").read_text())
    if state.get("save_s", 0.0) > trainer.grace_s:
        found.warnings.append(f"the last checkpoint ({path.name}) took {state['save_s']:.1f} s to save, more than "
                              f"trainer.grace_s={trainer.grace_s:g}: on a stop signal the checkpoint would be killed "
                              "before it completes. Give the job a longer grace period (SLURM KillWait/GraceTime, "
                              "terminationGracePeriodSeconds, torchrun --shutdown_timeout) and set trainer.grace_s "
                              "to it.")
    if state["world_size"] == info.world_size:
        return
    portable = all(has_portable(path, name) for name in state["engines"])
    if not portable:
        found.errors.append(f"checkpoint {path} was written by {state['world_size']} ranks and has no portable "
                            f"weights, and this job has {info.world_size}: resume it with {state['world_size']} "
                            "ranks, or start a new run (run.name=...).")
    else:
        found.warnings.append(f"checkpoint {path} was written by {state['world_size']} ranks, this job has "
                              f"{info.world_size}: weights and Adam moments are re-partitioned, "
                              "and the data continues at "
                              "the same global sample of the epoch.")


def resume_step(trainer, ckpt_root: Path) -> int:
    """The step this run resumes from (0 for a fresh start or a checkpoint check_resume rejects)."""
    from train.loop import find_resume

    try:
        path = find_resume(trainer, ckpt_root)
        return int(json.loads((path / "state.json").read_text())["step"]) if path else 0
    except (OSError, ValueError, KeyError):
        return 0


def check_config(cfg, found: Findings, start: int = 0) -> None:
    """`start`: the step the run resumes from."""
    every, end = cfg.trainer.ckpt_every, cfg.trainer.max_steps
    if (start // every + 1) * every >= end:
        since = f"step {start}, the checkpoint this run resumes from" if start else "step 0"
        found.warnings.append(f"trainer.ckpt_every={every}: no checkpoint between step {start} and the end "
                              f"(trainer.max_steps={end}), so a failure restarts from {since}.")
    if cfg.logger.kind == "wandb" and (cfg.logger.mode or os.environ.get("WANDB_MODE", "online")) == "online":
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = netrc.is_file() and host in netrc.read_text(errors="ignore")
        if not os.environ.get("WANDB_API_KEY") and not logged_in:
            found.errors.append("logger=wandb (online) but no W&B credentials: export WANDB_API_KEY on every "
                                "node, run `wandb login`, or set logger.mode=offline.")


def _guarded(check, found: Findings, *args) -> None:
    """A check that raises becomes an error finding: every rank must reach the all-gather."""
    try:
        check(*args)
    except Exception as err:  # noqa: BLE001
        found.errors.append(f"{check.__name__} failed: {type(err).__name__}: {err}")


def run_preflight(cfg, info: DistInfo, run_dir: Path) -> list[str]:
    """Collective. Raises PreflightError on every rank if any rank found an error; returns the
    warnings (rank 0 logs them)."""
    found = Findings()
    token = [uuid.uuid4().hex]
    dist.broadcast_object_list(token, src=0)
    probes = check_run_dir(run_dir, info, token[0], found)
    if info.is_main:
        _guarded(check_config, found, cfg, found, resume_step(cfg.trainer, run_dir / "checkpoints"))
        if getattr(cfg.data, "kind", "") != "synthetic":
            _guarded(check_data, found, cfg.data.loader, "data.loader", info, found)
    _guarded(check_resume, found, cfg.trainer, run_dir / "checkpoints", info, found)
    dist.barrier()  # every probe is written
    if info.is_main and probes is not None:
        check_shared(probes, info, token[0], found)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, (found.errors, found.warnings))  # also: every rank is past its probe
    if info.is_main and probes is not None:
        shutil.rmtree(probes, ignore_errors=True)
    errors = sorted({e for errs, _ in gathered for e in errs})
    warnings = sorted({w for _, warns in gathered for w in warns})
    if info.is_main:
        for warning in warnings:
            log.warning("%s", warning)
    if errors:
        raise PreflightError("preflight failed:\n  - " + "\n  - ".join(errors))
    return warnings
