"""Distributed state, built once and passed explicitly (docs/design.md, conventions).

Works under `python` (one process: a gloo/nccl group of size 1), `torchrun` (single or multi
node), the `deepspeed` launcher (its --local_rank argument is accepted and dropped) and `srun`
starting one task per GPU (the variables come from SLURM's, see cluster/launch.py).
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from infd.keyed_random import KeyedRandom, global_batch_indices

from train.slurm_env import slurm_dist_env

log = logging.getLogger("train")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_local_rank_arg(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra cannot parse; move it to the env."""
    out, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            if "=" in arg:
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            elif i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip_next = True
            continue
        out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or create, for a plain `python` run) the process group; pick the device."""
    slurm_env = slurm_dist_env(os.environ)
    if slurm_env is not None:  # srun started one task per GPU (e.g. hydra-submitit-launcher), no torchrun
        os.environ.update(slurm_env)
    if "WORLD_SIZE" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())  # also with one GPU per task
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        _init_process_group(backend)
        _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # wraps the group made above
    info = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[rank{info.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    return info


def _skip_shm_comm_op() -> None:
    """DeepSpeed builds its CPU shared-memory all-reduce (a C++ op compiled on first use: 28 s and 49 CPU-s
    on the development machine) whenever it joins a group on a CPU, and maps a 69 MB /dev/shm file per rank
    that it never removes. Only its inference and tensor-parallel all-reduce use that op; training's
    collectives go through torch.distributed. Marking the op incompatible makes DeepSpeed skip it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _init_process_group(backend: str) -> None:
    """env:// rendezvous. torchrun's workers share its agent's TCPStore, which outlives restarts:
    restarted workers would read the previous attempt's keys (gloo then connects to dead peers;
    seen with --max-restarts on torch 2.14). With one agent (one node) its restart count names the
    attempt for every worker, so the keys get that prefix. Across nodes the agents' counts can
    differ (a node restarted for a peer does not count a retry), so there torchrun must not share
    its store: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (set by cluster/), and a fresh store serves
    each attempt."""
    from torch.distributed.rendezvous import rendezvous

    store, rank, world_size = next(rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
            store = dist.PrefixStore(f"infd_attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        elif int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            log.warning("torchrun shares its store across restarts on %s nodes: a restart can hang. Export "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (the cluster/ launchers do).",
                        os.environ["GROUP_WORLD_SIZE"])
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


_FAILED = False  # a rank left on an error: no more collectives in this process


def shutdown(keep_group: bool = False, clean: bool = True) -> None:
    """Barrier then destroy: exits without it crashed intermittently under gloo. keep_group: the
    jobs of a local sweep run one after another in this process and DeepSpeed caches groups made
    from the first process group, so it stays until the process exits. clean=False (leaving on an
    error): no barrier, which would wait on peers busy in another collective until the timeout."""
    global _FAILED
    _FAILED = _FAILED or not clean
    if not dist.is_initialized() or _FAILED:
        return
    dist.barrier()
    if keep_group:
        if not getattr(shutdown, "registered", False):
            atexit.register(shutdown)
            shutdown.registered = True
        return
    dist.destroy_process_group()


def ranks_per_node() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def on_main(info: DistInfo, fn, *args, **kwargs):
    """Run a side effect (printing, logging, exporting) on rank 0 only."""
    return fn(*args, **kwargs) if info.is_main else None


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (all ranks must call)."""
    return max_over_ranks(int(flag), device) > 0


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (a small non-negative int), on every rank (all ranks must call)."""
    t = torch.tensor([float(value)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def seed_rank_stream(seed: int, info: DistInfo) -> None:
    """Call after the weights are built (from torch.manual_seed(seed), identical on every rank):
    what still draws from the global RNG during training (dropout masks) then differs per rank.
    Per-sample draws (noise, timesteps, caption dropout, KL samples) do not use it: they come
    from infd.keyed_random, keyed by the global sample index."""
    torch.manual_seed(int(np.random.SeedSequence([seed, info.rank, 0x5EED]).generate_state(1)[0]))


def micro_batch_randoms(seed: int, step: int, micro_batches: list, info: DistInfo) -> list[KeyedRandom]:
    """One KeyedRandom per micro-batch of this rank, keyed by its samples' global batch positions."""
    return [KeyedRandom(seed, step, global_batch_indices(m, info.rank, info.world_size, len(b)), info.device)
            for m, b in enumerate(micro_batches)]
