"""A node-level cache of shard chunks for object storage (data.loader.read_mode=shard_cache).

Reading every sample with its own GET costs one request per sample (20,000 GET/s at 1000 GPUs) and
reads a high-res image once per draw. Here a node fetches its shards in chunks of
`cache_chunk_mb` (one GET each, 8 MB or more) into a folder on its local disk, shared by all its ranks
and loader workers, and samples are read from there. With the node order (infd/data/node_order.py) a
node reads only its partition, one block of shards at a time, so each chunk is fetched about once
per epoch while the cache holds the node's current block (docs/data.md says how to size it).

Layout: CACHE_DIR/<digest of the shard's URL and size>/<chunk number>.

- Atomic fills: a chunk is written under a private temporary name and renamed, so a reader never
  sees part of one. A lock file per chunk (flock: the kernel releases it when its holder dies) makes
  the node's other processes wait for the one fill instead of sending their own GETs.
- Bounded: the node's processes add what they fill to a shared usage count (under a lock); past the
  limit the filler removes the least recently used chunks (by mtime, refreshed on use at most once a
  minute) down to 90% of it, and temporary files of processes that died. A reader that still has an
  evicted chunk open reads it to the end (POSIX keeps an unlinked file's data until it is closed); one
  that finds it gone fills it again.
- Reuse: chunks are plain files keyed by URL and size, so the next epoch, a restarted job or another
  job on the node reads what is there.

Counts per process: `CACHE["evicted"]`, chunks this process evicted (its fills are its GETs, counted with their
bytes in urls.RANGE_READS); the training log shows it as data/cache_evicted, the sign of a cache too small
for the node's block.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from infd.data.urls import ReadOptions, ShardReadError, read_range

log = logging.getLogger("infd.data")
CACHE = {"evicted": 0}
TOUCH_EVERY_S = 60.0  # recency is refreshed at most this often per chunk (one utime, not one per read)
EVICT_TO = 0.9  # an eviction pass frees the cache down to this fraction of its limit
# A chunk GET moves megabytes: it is hedged only once it is slower than its size at this rate would allow
# (a 16 MB chunk: hedge_after_s + 0.32 s), not after the delay meant for a sample's kilobytes.
HEDGE_FLOOR_BYTES_PER_S = 50e6
_lock = threading.Lock()


def default_cache_dir() -> Path:
    return Path(os.environ.get("INFD_SHARD_CACHE", Path.home() / ".cache" / "infd" / "shards"))


@dataclass(frozen=True)
class CacheOptions:
    """root: the node's cache folder; limit_bytes: its bound; chunk_bytes: bytes per GET (and per file)."""

    root: Path
    limit_bytes: int
    chunk_bytes: int


class ShardCache:
    """Ranged reads of shards through the node's chunk cache (picklable: loader workers get a copy)."""

    def __init__(self, options: CacheOptions, read_options: ReadOptions):
        self.options, self.read_options = options, read_options

    def read(self, url: str, shard_bytes: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the shard at `url` (of `shard_bytes` in all), from the
        cache, filling the chunks it lacks. Past the shard's end the result is short, as a file's."""
        size = self.options.chunk_bytes
        end = min(offset + length, shard_bytes)
        parts = []
        for chunk in range(offset // size, (max(end, offset + 1) - 1) // size + 1):
            lo, hi = max(offset, chunk * size), min(end, (chunk + 1) * size)
            if hi > lo:
                parts.append(self._read_chunk(url, shard_bytes, chunk, lo - chunk * size, hi - lo))
        return b"".join(parts)

    def chunk_path(self, url: str, shard_bytes: int, chunk: int) -> Path:
        digest = hashlib.sha1(f"{url}\0{shard_bytes}".encode()).hexdigest()[:20]
        return self.options.root / digest / f"{chunk:06d}"

    def _read_chunk(self, url: str, shard_bytes: int, chunk: int, offset: int, length: int) -> bytes:
        path = self.chunk_path(url, shard_bytes, chunk)
        for _ in range(8):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                data = self._fill(url, shard_bytes, chunk, path)
                if data is not None:  # this process fetched it: no need to find it again
                    return data[offset:offset + length]
                continue  # another process did: read the file (or fill again if it is already evicted)
            try:
                _touch(fd, path)
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        raise ShardReadError(f"{url}: chunk {chunk} was evicted from the shard cache {self.options.root} again and "
                             "again before it could be read: raise data.loader.cache_gb (docs/data.md sizes it)")

    def _fill(self, url: str, shard_bytes: int, chunk: int, path: Path) -> bytes | None:
        """Fetch one chunk into `path` and return it; None when another process (or thread) of the node
        filled it meanwhile."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a fill in progress elsewhere
            if path.exists():
                return None
            start = chunk * self.options.chunk_bytes
            n = min(self.options.chunk_bytes, shard_bytes - start)
            data = read_range(url, start, n, self._chunk_read_options(n))
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        self._account(n)
        return data

    def _chunk_read_options(self, n: int) -> ReadOptions:
        hedge = self.read_options.hedge_after_s
        return ReadOptions(hedge + n / HEDGE_FLOOR_BYTES_PER_S if hedge > 0 else 0.0,
                           self.read_options.request_timeout_s)

    def _account(self, added: int) -> None:
        """Add `added` bytes to the node's usage; past the limit, evict (both under the node's lock)."""
        root = self.options.root
        with open(root / "usage.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            usage_file = root / "usage"
            try:
                usage = int(usage_file.read_text() or 0) + added
            except (FileNotFoundError, ValueError):
                usage = self._scan_usage()
            if usage > self.options.limit_bytes:
                usage = self._evict()
            tmp = root / f"usage.{os.getpid()}.tmp"
            tmp.write_text(str(usage))
            os.replace(tmp, usage_file)

    def _chunks(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every complete chunk; temporary files of dead processes are removed."""
        found = []
        for sub in os.scandir(self.options.root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                try:
                    if name.endswith(".tmp"):
                        _remove_if_orphaned(entry.path, name)
                    elif not name.endswith(".lock"):
                        st = entry.stat()
                        found.append((st.st_mtime, st.st_size, Path(entry.path)))
                except FileNotFoundError:
                    pass
        return found

    def _scan_usage(self) -> int:
        return sum(size for _, size, _ in self._chunks())

    def _evict(self) -> int:
        """Remove the least recently used chunks down to EVICT_TO of the limit; the usage left."""
        chunks = sorted(self._chunks(), key=lambda c: c[0])
        usage, removed = sum(size for _, size, _ in chunks), 0
        for _, size, path in chunks:
            if usage <= EVICT_TO * self.options.limit_bytes:
                break
            try:
                path.unlink()
                usage -= size
                removed += 1
            except FileNotFoundError:
                pass
        with _lock:
            CACHE["evicted"] += removed
        log.debug("shard cache %s: evicted %d chunks, %.1f MB left", self.options.root, removed, usage / 1e6)
        return usage


def _touch(fd: int, path: Path) -> None:
    """Mark a chunk recently used (for eviction), at most once per TOUCH_EVERY_S."""
    now = time.time()
    if now - os.fstat(fd).st_mtime > TOUCH_EVERY_S:
        try:
            os.utime(path, (now, now))
        except FileNotFoundError:
            pass


def _remove_if_orphaned(path: str, name: str) -> None:
    """A fill's temporary file whose process has died (killed mid-fill)."""
    try:
        pid = int(name.split(".")[1])
    except (IndexError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        os.unlink(path)
    except PermissionError:
        pass
