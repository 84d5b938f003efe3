"""Launch commands rendered from a scheduler's environment, so shell scripts stay thin and testable.

    srun --ntasks-per-node 1 python -m cluster.launch torchrun --stage autoencoder -- experiment=...

runs on every node of a SLURM job and replaces itself with
    torchrun --nnodes N --nproc_per_node G --node_rank i --rdzv_backend c10d
             --rdzv_endpoint <first node>:<port> --rdzv_id <job id> --max_restarts R ...
             -m train.<stage> run.root=... run.name=<job name>-<job id> <overrides>
(INFD_DRY_RUN=1 prints it instead). `slurm_dist_env` gives the torch.distributed variables to a
process that srun started directly, one task per GPU (hydra-submitit-launcher does this).
Standard library only: it runs before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Mapping

STAGES = ("autoencoder", "diffusion")
# torchrun tears workers down with the signal it caught and waits this long for their checkpoint.
PREEMPT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class LaunchError(ValueError):
    pass


def _split_top_level(nodelist: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]+)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    out = []
    for item in match.group(1).split(","):
        lo, _, hi = item.partition("-")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{head}{n:0{width}d}{rest}" for rest in _expand_host(tail)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[001-003,007],login1' -> ['gpu001', 'gpu002', 'gpu003', 'gpu007', 'login1']."""
    hosts = [h for part in _split_top_level(nodelist.strip()) for h in _expand_host(part)]
    if not hosts:
        raise LaunchError(f"empty SLURM node list {nodelist!r}")
    return hosts


def node_hosts(env: Mapping[str, str]) -> list[str]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation (sbatch/srun)")
    if shutil.which("scontrol"):  # SLURM's own expansion when it is there
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def rendezvous_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else derived from the job id: jobs sharing a node get different ports."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000  # below Linux's ephemeral range (32768+)


def gpus_per_node(env: Mapping[str, str]) -> int:
    """NPROC_PER_NODE, else the GPUs SLURM gave this node, else 1 (one CPU process per node)."""
    for key in ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        if value:
            count = value.split(":")[-1].split("(")[0]  # 'a100:8' or '8(x2)'
            if not count.isdigit() or int(count) < 1:
                raise LaunchError(f"{key}={value!r}: expected a GPU count such as 8 or a100:8")
            return int(count)
    return 1


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
    return [python, "-m", "torch.distributed.run",
            "--nnodes", str(nnodes), "--nproc_per_node", str(gpus_per_node(env)),
            "--node_rank", env.get("SLURM_NODEID", "0"),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts[0]}:{rendezvous_port(env)}",
            "--rdzv_id", env.get("SLURM_JOB_ID", "local"),
            "--max_restarts", str(max_restarts),
            "--signals_to_handle", PREEMPT_SIGNALS, "--shutdown_timeout", str(shutdown_timeout),
            *training_args(env, stage, overrides)]


def slurm_dist_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a task srun started directly
    (one per GPU, no torchrun); None outside such a job step or for a step of one task."""
    tasks = env.get("SLURM_STEP_NUM_TASKS")  # only inside an srun step, never the batch shell
    if "WORLD_SIZE" in env or not tasks or int(tasks) < 2:
        return None
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": tasks,
            "MASTER_ADDR": node_hosts(env)[0], "MASTER_PORT": str(rendezvous_port(env))}


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
    except LaunchError as err:
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
    sys.exit(main())
