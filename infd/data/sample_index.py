"""The per-sample index of a shard set: flat arrays that every process memory-maps.

A directory holding:

  index.json     metadata: {"version": 2, "hr_threshold", totals, "shards": [tar names in order],
                 "exts": [the indexed member's extensions], "resolution_histogram",
                 "skipped": {reason: count}, ...}
  shards.npy     one record per shard (SHARD_DTYPE): its first sample id, sample count, high-res
                 count, excluded count and tar bytes
  samples.npy    one record per sample (SAMPLE_DTYPE), in tar order, shard after shard: where its
                 image member's data is (offset, size), its upright pixel size, its shard id,
                 flags (HR; EXCLUDED: no readable image), its extension (an index into "exts"),
                 and where its caption member is (offset, size, kind)
  hr_ids.npy     int64 ids of the high-res samples (the high-res stream draws from these)
  keys.bin, key_offsets.npy   the sample keys as one byte table (key i is bytes o[i]:o[i+1])

No Python object per sample: 10M samples are 10M records of 43 bytes that the OS pages in on use
and shares between all processes of a node. Random single records (the high-res stream) are
read with pread instead of through the map: a page fault maps 64 KB around it (fault-around),
so 1000 random draws through the map grow each process's RSS by about 600 MB. An index on S3 is
copied once per node into a local cache directory (`open_index`), then mapped.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infd.config import ConfigError
from infd.data.urls import copy_to_file, join_url, read_bytes

VERSION = 2
INDEX_NAME = "index.json"
HR, EXCLUDED = 1, 2  # flag bits
CAPTION_NONE, CAPTION_TXT, CAPTION_JSON = 0, 1, 2
SAMPLE_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("width", "<i4"), ("height", "<i4"),
                         ("shard", "<i4"), ("flags", "u1"), ("ext", "u1"), ("caption_offset", "<i8"),
                         ("caption_size", "<i4"), ("caption_kind", "u1")])
SHARD_DTYPE = np.dtype([("first", "<i8"), ("samples", "<i8"), ("hr", "<i8"), ("excluded", "<i8"),
                        ("bytes", "<i8")])
ARRAYS = ("shards.npy", "samples.npy", "hr_ids.npy", "key_offsets.npy")
FILES = (INDEX_NAME, *ARRAYS, "keys.bin")


@dataclass
class SampleIndex:
    """An opened index; the arrays are read-only memory maps."""

    root: Path
    meta: dict
    shards: np.ndarray
    samples: np.ndarray
    hr_ids: np.ndarray
    key_offsets: np.ndarray
    keys: np.ndarray

    @classmethod
    def open(cls, root: str | Path) -> SampleIndex:
        root = Path(root)
        meta = json.loads((root / INDEX_NAME).read_text())
        if meta.get("version") != VERSION:
            raise ConfigError(f"{root / INDEX_NAME}: index version {meta.get('version')}, expected {VERSION}: "
                             "rebuild it with python -m data_prep.index_shards")
        arrays = [np.load(root / name, mmap_mode="r") for name in ARRAYS]
        keys = (np.memmap(root / "keys.bin", np.uint8, "r") if (root / "keys.bin").stat().st_size
                else np.zeros(0, np.uint8))
        return cls(root, meta, *arrays, keys)

    @property
    def shard_names(self) -> list[str]:
        return self.meta["shards"]

    def key(self, sample_id: int) -> str:
        lo, hi = self._reader("key_offsets.npy").read(sample_id, 2)
        return os.pread(self._fd("keys.bin"), int(hi - lo), int(lo)).decode()

    def record(self, sample_id: int) -> np.void:
        """One sample's record (SAMPLE_DTYPE), read without mapping its neighbours."""
        return self.records(sample_id, 1)[0]

    def records(self, sample_id: int, n: int) -> np.ndarray:
        """Records sample_id, sample_id + 1, ... (up to n, fewer at the end of the index)."""
        return self._reader("samples.npy").read(sample_id, min(n, len(self.samples) - sample_id))

    def hr_id(self, i: int) -> int:
        return int(self._reader("hr_ids.npy").read(i, 1)[0])

    def _reader(self, name: str) -> _RecordReader:
        readers = self.__dict__.setdefault("_readers", {})
        if name not in readers:
            readers[name] = _RecordReader(self._fd(name), getattr(self, name.removesuffix(".npy")))
        return readers[name]

    def _fd(self, name: str) -> int:
        fds = self.__dict__.setdefault("_fds", {})
        if name not in fds:
            fds[name] = os.open(self.root / name, os.O_RDONLY)
        return fds[name]

    def ext(self, sample_id: int) -> str:
        """The indexed member's extension (its record by pread, as `record`)."""
        return self.meta["exts"][int(self.record(sample_id)["ext"])]

    def __getstate__(self):  # processes that unpickle it (spawned workers) map the files themselves
        return {"root": self.root}

    def __setstate__(self, state):
        self.__dict__.update(vars(SampleIndex.open(state["root"])))

    def main_count(self, shard: int, exclude_hr: bool) -> int:
        """Samples of a shard in the main stream (the high-res ones have their own when p_hr > 0)."""
        rec = self.shards[shard]
        return int(rec["samples"] - rec["excluded"] - (rec["hr"] if exclude_hr else 0))

    def in_main_stream(self, shard: int, exclude_hr: bool) -> np.ndarray:
        """bool (samples of the shard,), in tar order: which of them the main stream uses."""
        rec = self.shards[shard]
        flags = self.records(int(rec["first"]), int(rec["samples"]))["flags"]  # pread: see the module docstring
        return (flags & (EXCLUDED | (HR if exclude_hr else 0))) == 0


class _RecordReader:
    """Consecutive records of an .npy array by pread (the array's memmap gives dtype and offset)."""

    def __init__(self, fd: int, array: np.memmap):
        self.fd, self.dtype = fd, array.dtype
        self.base = array.offset if isinstance(array, np.memmap) else None

    def read(self, i: int, n: int) -> np.ndarray:
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, n * size, self.base + i * size), self.dtype)


def index_cache_dir() -> Path:
    return Path(os.environ.get("INFD_INDEX_CACHE") or Path.home() / ".cache" / "infd" / "index")


def open_index(url: str, cache_dir: Path | None = None) -> SampleIndex:
    """Open the index at a local directory, or at an s3:// prefix: its files are copied once per
    node into cache_dir (default: $INFD_INDEX_CACHE or ~/.cache/infd/index)/<hash of the URL and
    index.json>, under a file lock: the first process copies, the others wait and map the same files.
    The copy streams each file to disk (samples.npy is about 4.3 GB at 100M samples) and a copy that
    was killed continues where it stopped."""
    if not url.startswith("s3://"):
        return SampleIndex.open(url)
    meta = read_bytes(join_url(url, INDEX_NAME))  # small; keys the cache, so a rebuilt index is copied anew
    local = Path(cache_dir or index_cache_dir()) / hashlib.sha256(url.encode() + b"\0" + meta).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (local / ".complete").exists():
            for name in FILES:
                if (local / name).exists():  # copied whole before an earlier open was killed
                    continue
                tmp = local / (name + ".tmp")  # streamed to disk; a copy cut short continues
                copy_to_file(join_url(url, name), tmp)
                tmp.rename(local / name)
            (local / ".complete").write_text(url)
    return SampleIndex.open(local)


def shard_records(samples_per_shard: list[np.ndarray], tar_bytes: list[int], first: int = 0) -> np.ndarray:
    """SHARD_DTYPE records for consecutive shards whose sample records are given."""
    out = np.zeros(len(samples_per_shard), SHARD_DTYPE)
    for i, (recs, size) in enumerate(zip(samples_per_shard, tar_bytes)):
        out[i] = (first, len(recs), int(np.count_nonzero(recs["flags"] & HR)),
                  int(np.count_nonzero(recs["flags"] & EXCLUDED)), size)
        first += len(recs)
    return out


def write_index(root: Path, meta: dict, shards: np.ndarray, samples: np.ndarray, keys: list[bytes]) -> None:
    """Write an index into `root` (created). `meta` gets the version and the totals."""
    root.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
    np.save(root / "shards.npy", shards)
    np.save(root / "samples.npy", samples)
    np.save(root / "hr_ids.npy", np.flatnonzero(samples["flags"] & HR).astype(np.int64))
    np.save(root / "key_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    (root / "keys.bin").write_bytes(b"".join(keys))
    _write_meta(root, meta, shards)


def _write_meta(root: Path, meta: dict, shards: np.ndarray) -> None:
    meta = {**meta, "version": VERSION, "total_samples": int(shards["samples"].sum()),
            "total_hr": int(shards["hr"].sum()), "total_excluded": int(shards["excluded"].sum()),
            "total_bytes": int(shards["bytes"].sum())}
    (root / INDEX_NAME).write_text(json.dumps(meta, indent=1))


def merge_indexes(parts: list[Path], out: Path) -> SampleIndex:
    """Concatenate the indexes of consecutive shard ranges (in order) into one at `out`, streaming
    the arrays through memory maps (the merged index need not fit in memory)."""
    opened = [SampleIndex.open(p) for p in parts]
    n_samples = sum(len(p.samples) for p in opened)
    out.mkdir(parents=True, exist_ok=True)
    samples = np.lib.format.open_memmap(out / "samples.npy", "w+", SAMPLE_DTYPE, (n_samples,))
    key_offsets = np.lib.format.open_memmap(out / "key_offsets.npy", "w+", np.int64, (n_samples + 1,))
    shards, hr_ids, first, key_base = [], [], 0, 0
    key_offsets[0] = 0
    with open(out / "keys.bin", "wb") as keys:
        for part in opened:
            n = len(part.samples)
            samples[first:first + n] = part.samples
            key_offsets[first + 1:first + n + 1] = np.asarray(part.key_offsets[1:]) + key_base
            with open(part.root / "keys.bin", "rb") as src:
                shutil.copyfileobj(src, keys)
            recs = np.array(part.shards)
            recs["first"] += first
            shards.append(recs)
            hr_ids.append(np.asarray(part.hr_ids) + first)
            first, key_base = first + n, key_base + int(part.key_offsets[-1])
    samples.flush()
    key_offsets.flush()
    all_shards = np.concatenate(shards) if shards else np.zeros(0, SHARD_DTYPE)
    np.save(out / "shards.npy", all_shards)
    np.save(out / "hr_ids.npy", np.concatenate(hr_ids) if hr_ids else np.zeros(0, np.int64))
    _write_meta(out, _merged_meta([p.meta for p in opened]), all_shards)
    return SampleIndex.open(out)


def _merged_meta(metas: list[dict]) -> dict:
    first = metas[0]
    skipped: dict[str, int] = {}
    for meta in metas:
        for reason, n in meta.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    counts = np.sum([m["resolution_histogram"]["counts"] for m in metas], axis=0).tolist()
    merged = {k: v for k, v in first.items() if not k.startswith("total_")}
    return {**merged, "shards": [name for m in metas for name in m["shards"]],
            "resolution_histogram": {**first["resolution_histogram"], "counts": counts}, "skipped": skipped}
