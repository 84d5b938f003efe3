"""The resolution histogram's bins (long side, upright), shared by the shard builder's statistics
and the sample index (infd/data/sample_index.py)."""
from __future__ import annotations

HISTOGRAM_EDGES = [0, 256, 512, 1024, 2048, 4096, 8192, 16384]


def histogram_bin(long_side: int) -> int:
    return max(i for i, edge in enumerate(HISTOGRAM_EDGES) if long_side >= edge)
