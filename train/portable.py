"""The portable layout of a checkpoint's tensors: every tensor written once, by one rank, as a full
tensor under its name, so that any world size, any ZeRO stage and a process without DeepSpeed
read it.

    portable/<engine>/weights-rank00000-of-00002.safetensors   full fp32 parameters (and buffers) rank 0 owns
    portable/<engine>/moments-rank00000-of-00002.safetensors   their Adam moments ("<name>::exp_avg", "::exp_avg_sq")
    ema/ema-rank00000-of-00002.safetensors                      the EMA tensors rank 0 owns

Which rank owns a tensor is a pure function of the names, sizes and world size (`assign_owners`),
so the ranks agree without a message and share the writing about equally. Every rank writes its
file, empty or not; a reader takes all W of them. Checkpoints of older versions held one file per
engine (`portable/<engine>.safetensors`, `.optim.safetensors`, `ema.safetensors`): read too.
"""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

PORTABLE = "portable"
EMA = "ema"


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """name -> rank: the largest tensors first, each to the rank with the fewest bytes so far (lowest
    rank on ties). sizes: name -> bytes. The same on every rank for the same input."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


def shard_name(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world_size:05d}.safetensors"


def engine_dir(ckpt: Path, engine: str) -> Path:
    return ckpt / PORTABLE / engine


def _shards(directory: Path, kind: str) -> list[Path]:
    files = sorted(directory.glob(f"{kind}-rank*-of-*.safetensors"))
    if files:
        expected = int(files[0].name.rsplit("-of-", 1)[1].split(".")[0])
        if len(files) != expected:
            raise FileNotFoundError(f"{directory}: {len(files)} of {expected} {kind} files; the checkpoint "
                                    "is incomplete")
    return files


def _legacy(ckpt: Path, engine: str, kind: str) -> Path:
    return ckpt / PORTABLE / (f"{engine}.safetensors" if kind == "weights" else f"{engine}.optim.safetensors")


def has_portable(ckpt: Path, engine: str) -> bool:
    return bool(_shards(engine_dir(ckpt, engine), "weights")) or _legacy(ckpt, engine, "weights").exists()


def read_tensors(ckpt: Path, engine: str, kind: str) -> dict[str, Tensor]:
    """Every tensor of `kind` ("weights" or "moments") of `engine`, merged from the ranks' files (CPU)."""
    files = _shards(engine_dir(ckpt, engine), kind)
    if not files:
        legacy = _legacy(ckpt, engine, kind)
        if not legacy.exists():
            raise FileNotFoundError(f"{ckpt} holds no portable {kind} of {engine}")
        return load_file(str(legacy))
    out = {}
    for path in files:
        out |= load_file(str(path))
    return out


def read_ema(ckpt: Path) -> dict[str, Tensor] | None:
    """The EMA tensors, merged (None: the run kept no EMA)."""
    files = _shards(ckpt / EMA, EMA)
    if files:
        out = {}
        for path in files:
            out |= load_file(str(path))
        return out
    legacy = ckpt / "ema.safetensors"
    return load_file(str(legacy)) if legacy.exists() else None


class TensorIndex:
    """Reads one tensor at a time from a kind's files (memory bounded by the largest tensor)."""

    def __init__(self, ckpt: Path, engine: str, kind: str):
        files = _shards(engine_dir(ckpt, engine), kind) or [_legacy(ckpt, engine, kind)]
        self.handles = [safe_open(str(p), "pt") for p in files]
        self.where = {key: h for h in self.handles for key in h.keys()}

    def get(self, name: str) -> Tensor | None:
        handle = self.where.get(name)
        return None if handle is None else handle.get_tensor(name)
