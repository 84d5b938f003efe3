"""Launch commands rendered from a scheduler's environment, so shell scripts stay thin and testable.

    srun --ntasks-per-node 1 python -m cluster.launch torchrun --stage autoencoder -- experiment=...

runs on every node of a SLURM job and replaces itself with torchrun (run by cluster/elastic.py,
which exits 128 + the signal when a stop signal ended training with its checkpoint saved):
    python -m cluster.elastic --nnodes N --nproc_per_node G --node_rank i --rdzv_backend c10d
             --rdzv_endpoint <first node>:<port> --rdzv_id <job id> --max_restarts R ...
             -m train.<stage> run.root=... run.name=<job name>-<job id> <overrides>
(INFD_DRY_RUN=1 prints it instead). SLURM's variables are read by train/slurm_env.py, which the
trainers use too. Standard library only: it runs before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Mapping

from infd.utils.process_main import run_as_process
from train.slurm_env import SlurmEnvError, gpus_per_node, node_hosts, rendezvous_port

STAGES = ("autoencoder", "diffusion")
# torchrun tears workers down with the signal it caught and waits this long for their checkpoint.
PREEMPT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class LaunchError(ValueError):
    pass


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def training_args(env: Mapping[str, str], stage: str, overrides: list[str]) -> list[str]:
    """-m train.<stage> with run.root / run.name defaults from the job (a requeued job keeps its id,
    hence its run directory, and resumes from its latest checkpoint)."""
    if stage not in STAGES:
        raise LaunchError(f"stage {stage!r}: choose one of {', '.join(STAGES)}")
    args = ["-m", f"train.{stage}"]
    if not _has_override(overrides, "run.root") and env.get("RUN_ROOT"):
        args.append(f"run.root={env['RUN_ROOT']}")
    if not _has_override(overrides, "run.name"):
        job = env.get("SLURM_JOB_ID", "local")
        args.append(f"run.name={env.get('RUN_NAME') or env.get('SLURM_JOB_NAME', 'infd') + '-' + job}")
    return args + list(overrides)


def torchrun_command(env: Mapping[str, str], stage: str, overrides: list[str], max_restarts: int = 3,
                     shutdown_timeout: int = 240, python: str = sys.executable) -> list[str]:
    """The torchrun line one node runs in a SLURM job (c10d rendezvous on the first node)."""
    hosts = node_hosts(env)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    return [python, "-m", "cluster.elastic",
            "--nnodes", str(nnodes), "--nproc_per_node", str(gpus_per_node(env)),
            "--node_rank", env.get("SLURM_NODEID", "0"),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts[0]}:{rendezvous_port(env)}",
            "--rdzv_id", env.get("SLURM_JOB_ID", "local"),
            "--max_restarts", str(max_restarts),
            "--signals_to_handle", PREEMPT_SIGNALS, "--shutdown_timeout", str(shutdown_timeout),
            *training_args(env, stage, overrides)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("torchrun", help="exec this node's torchrun for the SLURM job it runs in")
    run.add_argument("--stage", required=True, choices=STAGES)
    run.add_argument("--max-restarts", type=int, default=int(os.environ.get("MAX_RESTARTS", "3")))
    run.add_argument("--shutdown-timeout", type=int, default=int(os.environ.get("SHUTDOWN_TIMEOUT", "240")))
    run.add_argument("overrides", nargs="*", help="Hydra overrides for the training entry point (after --)")
    args = parser.parse_args(argv)
    try:
        cmd = torchrun_command(os.environ, args.stage, args.overrides, args.max_restarts, args.shutdown_timeout)
    except (LaunchError, SlurmEnvError) as err:
        print(f"cluster.launch: {err}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if os.environ.get("INFD_DRY_RUN") == "1":
        return 0
    # Each restart gets a fresh store: torchrun's shared one would hand restarted workers stale keys,
    # and agents on different nodes can disagree on the attempt number (train/dist.py).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(run_as_process(main))
