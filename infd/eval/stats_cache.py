"""Real-image feature statistics, computed once and cached on disk.

A cache entry is `<key>.npz` (mu (D,), sigma (D, D), float64) plus `<key>.json` (meta: what was
measured, how many images were used and skipped, ...). Both are written to a temporary file in
the same folder and renamed into place, so a killed run or a concurrent writer never leaves a
half-written entry; the JSON is renamed last and marks the entry complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = 1  # bump if the stored layout changes


def _readable(text: str, limit: int = 40) -> str:
    """Filename-safe, short version of text (the hash carries the exact value)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")[:limit] or "x"


def cache_key(index_id: str, view: str, n: int, feature_id: str) -> str:
    """Key of the statistics of `n` real images of dataset `index_id`, seen as `view` (the
    metric's base name: "pfid_256_1k" = 256 crops of the 1024 square, "fid_256" = whole images
    at 256), under feature network `feature_id`.

    Readable parts for a person listing the folder, plus a hash of the exact values, so two
    inputs that read alike after sanitising still get different keys.
    """
    exact = json.dumps([FORMAT, index_id, view, int(n), feature_id])
    digest = hashlib.sha256(exact.encode()).hexdigest()[:16]
    return f"{_readable(index_id)}_{_readable(view)}_n{int(n)}_{_readable(feature_id)}_{digest}"


def _paths(cache_dir: str | Path, key: str) -> tuple[Path, Path]:
    folder = Path(cache_dir)
    return folder / f"{key}.npz", folder / f"{key}.json"


def load(cache_dir: str | Path, key: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(mu (D,), sigma (D, D), meta) of a complete entry, else None."""
    npz_path, meta_path = _paths(cache_dir, key)
    if not (meta_path.is_file() and npz_path.is_file()):
        return None
    with np.load(npz_path, allow_pickle=False) as data:  # never unpickle a file from disk
        mu, sigma = data["mu"], data["sigma"]
    return mu, sigma, json.loads(meta_path.read_text())


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(cache_dir: str | Path, key: str, mu, sigma, meta: dict | None = None) -> dict:
    """Write an entry atomically; returns the stored meta (with key, shapes and time added)."""
    npz_path, meta_path = _paths(cache_dir, key)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    meta = {**(meta or {}), "key": key, "format": FORMAT, "dim": int(mu.shape[0]), "created": time.time()}
    _atomic_write(npz_path, lambda f: np.savez(f, mu=mu, sigma=sigma), "wb")
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True)), "w")
    return meta


def load_or_compute(cache_dir: str | Path, key: str,
                    compute_fn: Callable[[], tuple[Any, Any] | tuple[Any, Any, dict]]
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cached (mu (D,), sigma (D, D), meta) for key; on a miss compute_fn() -> (mu, sigma) or
    (mu, sigma, meta) is called once and its result stored.

    Distributed use: compute_fn may gather over ranks, but only one rank should call this with a
    writable folder (or all may: identical entries replace each other atomically).
    """
    hit = load(cache_dir, key)
    if hit is not None:
        return hit
    out = compute_fn()
    mu, sigma, meta = (*out, {}) if len(out) == 2 else out
    meta = save(cache_dir, key, mu, sigma, meta)
    return np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64), meta
