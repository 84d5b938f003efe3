"""What a node's shard cache (infd/data/shard_cache.py) fetches for a sequence of sample reads: an LRU of
chunks with the cache's chunk size and limit, for sizing the cache and for benchmarks/data_at_scale.py
(which checks it against a real run in tests/test_node_cache.py).

The real cache evicts by modification time refreshed at most once a minute and its readers run
concurrently, so this is the cache's policy in its ideal form; with a cache that holds what the node
reads between two visits of a chunk (the sizing docs/data.md gives) both fetch each chunk once.

Shapes: a read is (shard, first byte, end byte); `shard_bytes[shard]` the shard's size.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass
class CacheFigures:
    """reads: sample reads; gets, get_bytes: chunk fetches from object storage and their bytes; missed:
    per read, whether it waited for a fetch (a read spanning two chunks counts once)."""

    reads: int
    gets: int
    get_bytes: int
    missed: np.ndarray


class ChunkLRU:
    def __init__(self, chunk_bytes: int, limit_bytes: int):
        self.chunk_bytes, self.limit_bytes = chunk_bytes, limit_bytes
        self.held: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.usage = self.gets = self.get_bytes = 0

    def read(self, shard: int, start: int, end: int, shard_bytes: int) -> bool:
        """One sample read; True when a chunk had to be fetched."""
        missed = False
        for chunk in range(start // self.chunk_bytes, (max(end, start + 1) - 1) // self.chunk_bytes + 1):
            key = (shard, chunk)
            if key in self.held:
                self.held.move_to_end(key)
                continue
            size = min(self.chunk_bytes, shard_bytes - chunk * self.chunk_bytes)
            self.held[key] = size
            self.usage += size
            self.gets += 1
            self.get_bytes += size
            missed = True
            while self.usage > self.limit_bytes and len(self.held) > 1:
                self.usage -= self.held.popitem(last=False)[1]
        return missed


def simulate(reads: Iterable[tuple[int, int, int]], shard_bytes, chunk_bytes: int, limit_bytes: int) -> CacheFigures:
    """Run `reads` (in the order a node makes them) through one node's cache."""
    lru = ChunkLRU(chunk_bytes, limit_bytes)
    missed = [lru.read(shard, start, end, int(shard_bytes[shard])) for shard, start, end in reads]
    return CacheFigures(len(missed), lru.gets, lru.get_bytes, np.array(missed, bool))
