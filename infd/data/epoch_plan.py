"""Where each sample of an epoch goes: a function of (seed, epoch, position) only, so the order
does not depend on the world size or the number of workers, and any position is found in
constant time (resume reads only what the next batches need).

Slots. An epoch is a sequence of sample slots 0, 1, 2, ...; with W ranks of B samples, global
batch k starting from slot s covers slots [s + kWB, s + (k+1)WB) and rank r takes the B from
s + kWB + rB. The loader's position is the epoch and its first unconsumed slot: a global sample
count, valid at any world size.

High-res slots. With p_hr > 0, slot g is high-res when floor((g+1) p + phase) > floor(g p + phase)
(phase drawn per epoch): a fraction p of the slots, evenly spread, so slot g's main position
(the main slots before it) is g - floor(g p + phase), constant time. Any B consecutive slots hold
B p high-res samples, up to one more or fewer.

Main order. The main stream's samples (all but excluded, and all but high-res when p_hr > 0) in
shard order, shards shuffled per (seed, epoch), are cut into blocks of `block` samples and each
block is permuted by (seed, epoch, block number): a block shuffle. A block is found from the
shards' main counts alone and permuted in O(block).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import numpy as np

PHASE, SHARDS, BLOCK = 11, 12, 13  # RNG purposes


def epoch_rng(seed: int, epoch: int, purpose: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, purpose, *more])


class SlotPlan:
    """Which slots of an epoch are high-res, and the main position of the others."""

    def __init__(self, p_hr: float, main_total: int | None, seed: int, epoch: int, key: tuple = ()):
        """main_total: main-stream samples of an epoch (None: endless, one epoch forever); key: added to the
        phase's RNG key (a canonical node's own plan, infd/data/node_order.py)."""
        self.p = p_hr
        self.phase = float(epoch_rng(seed, epoch, PHASE, *key).random()) if p_hr > 0 else 0.0
        self.slots = None if main_total is None else self._slots_for(main_total)

    def hr_before(self, g: int) -> int:
        return math.floor(g * self.p + self.phase) if self.p > 0 else 0

    def is_hr(self, g: int) -> bool:
        return self.hr_before(g + 1) > self.hr_before(g)

    def main_position(self, g: int) -> int:
        return g - self.hr_before(g)

    def _slots_for(self, main_total: int) -> int:
        """The most slots whose main ones do not exceed main_total."""
        t = int(main_total / (1 - self.p)) + 2
        while self.main_position(t) > main_total:
            t -= 1
        return t


class BlockOrder:
    """main position -> sample id, for one epoch of a shard set.

    shard_ids(i) -> int64 array: the main-stream sample ids of shard i (of data.shards), in tar
    order. Holds the last few blocks (`block` ids each) and shards' id arrays; nothing grows
    with the data set beyond one number per shard.

    span, key: the order of one range [lo, hi) of the epoch's shuffled concatenation (a canonical
    node's partition, infd/data/node_order.py), its blocks permuted with `key` added to the RNG's key;
    by default the whole epoch."""

    def __init__(self, main_counts: np.ndarray, shard_ids: Callable[[int], np.ndarray], block: int, seed: int,
                 epoch: int, cached_blocks: int = 2, span: tuple[int, int] | None = None, key: tuple = ()):
        self.order = epoch_rng(seed, epoch, SHARDS).permutation(len(main_counts))
        self.ends = np.cumsum(main_counts[self.order])
        self.shard_ids, self.block, self.seed, self.epoch = shard_ids, block, seed, epoch
        self.lo, self.hi = span if span is not None else (0, int(self.ends[-1]) if len(self.ends) else 0)
        self.key = tuple(key)
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cached_blocks = cached_blocks

    @property
    def total(self) -> int:
        return self.hi - self.lo

    def sample_id(self, position: int) -> int:
        k = position // self.block
        return int(self.block_ids(k)[position - k * self.block])

    def block_shards(self, position: int) -> np.ndarray:
        """The shards (of data.shards) that the block holding `position` draws from."""
        lo, hi = self._block_range(position // self.block)
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.ends, hi - 1, side="right"))
        return self.order[first:last + 1]

    def _block_range(self, k: int) -> tuple[int, int]:
        return self.lo + k * self.block, min(self.lo + (k + 1) * self.block, self.hi)

    def block_ids(self, k: int) -> np.ndarray:
        """The sample ids of block k, in their permuted order (main positions k * block onwards)."""
        if k in self.blocks:
            self.blocks.move_to_end(k)
            return self.blocks[k]
        lo, hi = self._block_range(k)
        first = int(np.searchsorted(self.ends, lo, side="right"))
        parts, start = [], int(self.ends[first - 1]) if first else 0
        for j in range(first, len(self.order)):
            if start >= hi:
                break
            ids = self.shard_ids(int(self.order[j]))
            parts.append(ids[max(lo - start, 0):hi - start])
            start += len(ids)
        ids = np.concatenate(parts)
        ids = ids[epoch_rng(self.seed, self.epoch, BLOCK, *self.key, k).permutation(len(ids))]
        self.blocks[k] = ids
        if len(self.blocks) > self.cached_blocks:
            self.blocks.popitem(last=False)
        return ids
