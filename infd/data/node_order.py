"""A node-partitioned epoch order (data.loader.order=node, through infd/data/orders.py): a global
batch draws from many shards, and each node reads only its own part of the data.

The epoch's shuffled shard sequence (infd/data/epoch_plan.py) is cut into C equal ranges of main
samples, one per canonical node (C = data.loader.canonical_nodes, a constant of the run that stays when
the job is resized). Each range is block-shuffled on its own, keyed by (seed, epoch, node, block), and
has its own high-res/main slot plan keyed by (seed, epoch, node). Global batch k of G slots gives
slot u (0 <= u < G) to canonical node u mod C, at that node's slot k G/C + u div C: every batch takes
G/C samples from every canonical node's current block. The order is a function of (seed, epoch, slot)
alone, as before: any world size sees the same global batches, every main sample of the used part of
each range appears once per epoch, and any slot is found in constant time.

Physical nodes: N nodes of R ranks, N dividing C (node n serves the canonical nodes c with c mod N = n)
or a multiple of C (N / C nodes share each canonical node, each taking a contiguous share of its
slots). Rank l of node n takes a contiguous B of its node's slots, so a rank only reads the ranges of
its node.

Shapes: C canonical nodes, G global batch (C must divide it), B = G / (N R) per rank.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from infd.config import ConfigError
from infd.data.epoch_plan import BlockOrder, SlotPlan


class NodeOrder:
    """Slot -> (canonical node, the node's own slot), and from there the sample, for one epoch."""

    def __init__(self, main_counts: np.ndarray, shard_ids: Callable[[int], np.ndarray], block: int, seed: int,
                 epoch: int, canonical_nodes: int, global_batch: int, p_hr: float = 0.0):
        C = canonical_nodes
        if C < 1 or global_batch % C:
            raise ConfigError(f"config key 'data.loader.canonical_nodes' = {C} must divide the global batch "
                              f"({global_batch} = ranks x data.loader.batch_size): pick a divisor of it")
        self.C, self.G, self.per_node = C, global_batch, global_batch // C
        self.args = (main_counts, shard_ids, block, seed, epoch)
        total = int(main_counts.sum())
        size, extra = divmod(total, C)
        self.starts = [c * size + min(c, extra) for c in range(C + 1)]
        self.plans = [SlotPlan(p_hr, self.starts[c + 1] - self.starts[c], seed, epoch, key=(c,)) for c in range(C)]
        self._parts: dict[int, BlockOrder] = {}

    @property
    def batches(self) -> int:
        """Global batches in this epoch: as many as the shortest canonical node fills."""
        return min(plan.slots for plan in self.plans) // self.per_node

    def locate(self, g: int) -> tuple[int, int]:
        """(canonical node, its slot) of global slot g."""
        k, u = divmod(g, self.G)
        return u % self.C, k * self.per_node + u // self.C

    def is_hr(self, g: int) -> bool:
        c, t = self.locate(g)
        return self.plans[c].is_hr(t)

    def main_sample(self, g: int) -> int:
        """The sample id of a main slot."""
        c, t = self.locate(g)
        return self.part(c).sample_id(self.plans[c].main_position(t))

    def window_shards(self, g: int) -> np.ndarray:
        """The shards of the block that slot g's canonical node is reading (high-res draws come from them)."""
        c, t = self.locate(g)
        return self.part(c).block_shards(min(self.plans[c].main_position(t), self.part(c).total - 1))

    def part(self, c: int) -> BlockOrder:
        if c not in self._parts:
            counts, ids, block, seed, epoch = self.args
            self._parts[c] = BlockOrder(counts, ids, block, seed, epoch, span=(self.starts[c], self.starts[c + 1]),
                                        key=(c,))
        return self._parts[c]

    def rank_slots(self, k: int, rank: int, world_size: int, ranks_per_node: int) -> list[int]:
        """The global slots of batch k that `rank` builds (its node's, a contiguous share per rank)."""
        nodes = world_size // ranks_per_node
        check_nodes(self.C, nodes)
        node, local = divmod(rank, ranks_per_node)
        per_rank = self.G // world_size
        if self.C % nodes == 0:
            residue, stride, first = node, nodes, 0
        else:
            residue, stride, first = node % self.C, self.C, (node // self.C) * (self.G // nodes)
        first += local * per_rank
        return [k * self.G + residue + stride * i for i in range(first, first + per_rank)]


def check_nodes(canonical_nodes: int, nodes: int) -> None:
    if canonical_nodes % nodes and nodes % canonical_nodes:
        raise ConfigError(f"config key 'data.loader.canonical_nodes' = {canonical_nodes} and {nodes} physical "
                          "nodes: one must divide the other. Keep canonical_nodes when resizing the job and run on "
                          "a divisor or a multiple of it")
