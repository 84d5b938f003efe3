"""SLURM's environment, read once for the launchers (cluster/) and the trainers (train/dist.py):
the node list, the rendezvous port, GPUs per node, and the torch.distributed variables of a task
srun started directly (one per GPU, no torchrun; hydra-submitit-launcher does this).
Standard library only: cluster/launch.py imports it before anything heavy.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping


class SlurmEnvError(ValueError):
    """The SLURM environment lacks or garbles what a launch needs."""


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
        raise SlurmEnvError(f"empty SLURM node list {nodelist!r}")
    return hosts


def node_hosts(env: Mapping[str, str]) -> list[str]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation (sbatch/srun)")
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
    """Processes per node: NPROC_PER_NODE, else the GPUs SLURM gave this node, else 1. A GPU count
    of 0 (`sbatch --gpus-per-node=0`, how a CPU job overrides the scripts' GPU request) means one
    CPU process per node, as no GPU variable at all does."""
    for key in ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        if value:
            count = value.split(":")[-1].split("(")[0]  # 'a100:8' or '8(x2)'
            if not count.isdigit() or (key == "NPROC_PER_NODE" and int(count) < 1):
                raise SlurmEnvError(f"{key}={value!r}: expected a count such as 8 or a100:8; set NPROC_PER_NODE "
                                    "to the number of processes per node to override it")
            return max(int(count), 1)
    return 1


def slurm_dist_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a task srun started directly
    (one per GPU, no torchrun); None outside such a job step or for a step of one task."""
    tasks = env.get("SLURM_STEP_NUM_TASKS")  # only inside an srun step, never the batch shell
    if "WORLD_SIZE" in env or not tasks or int(tasks) < 2:
        return None
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": tasks,
            "MASTER_ADDR": node_hosts(env)[0], "MASTER_PORT": str(rendezvous_port(env))}
