"""An epoch's order as the loader uses it, whichever `data.loader.order` chose: which slots a rank
builds for a global batch, which of them are high-res, and the samples to try for each (the first,
then its replacements, see infd/data/loader.py).

`auto` (the default) picks `node` for indexed shards on s3:// and `global` otherwise (resolve_order).

- `global`: the global block shuffle of infd/data/epoch_plan.py; a rank takes a contiguous B
  of each global batch's slots; high-res draws are uniform over the high-res samples.
- `node`: the node-partitioned order of infd/data/node_order.py; a rank takes its node's slots; a
  high-res draw comes from the shards of its canonical node's current block (a shard weighted by its
  high-res count, then one of them uniformly), from all high-res samples only where that block's
  shards hold none.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from infd.config import ConfigError
from infd.data.epoch_plan import SlotPlan, epoch_rng
from infd.data.node_order import NodeOrder

RETRIES = 8  # positions (main) or draws (high-res) tried before a slot is given up on
HR_PICK = 21  # RNG purpose
ORDERS = ("global", "node")


class GlobalOrder:
    def __init__(self, source, cfg, epoch: int, global_batch: int):
        self.source, self.cfg, self.epoch = source, cfg, epoch
        self.plan = SlotPlan(cfg.p_hr, source.size, cfg.seed, epoch)
        self.order = source.order(cfg.seed, epoch, cfg.shuffle_block)

    @property
    def slots(self) -> int | None:
        return self.plan.slots

    def rank_slots(self, start: int, rank: int, world_size: int, ranks_per_node: int) -> list[int]:
        """The slots of the global batch starting at slot `start` that `rank` builds."""
        B = self.cfg.batch_size
        return list(range(start + rank * B, start + (rank + 1) * B))

    def is_hr(self, g: int) -> bool:
        return self.plan.is_hr(g)

    def main_picks(self, g: int) -> Iterator[int]:
        """The sample at slot g's main position, then (replacements) those at the next positions."""
        position, size = self.plan.main_position(g), self.source.size
        for k in range(RETRIES):
            yield self.order.sample_id((position + k) % size if size else position + k)

    def hr_picks(self, g: int) -> Iterator[int]:
        rng = epoch_rng(self.cfg.seed, self.epoch, HR_PICK, g)
        for _ in range(RETRIES):
            yield self.source.hr_id(int(rng.integers(self.source.hr_size)))


class NodeEpochOrder:
    def __init__(self, source, cfg, epoch: int, global_batch: int):
        if source.size is None:
            raise ConfigError("data.loader.order=node needs shards with an index (an endless source has no "
                              "epoch to partition): use data.loader.order=global")
        if cfg.canonical_nodes < 1:
            raise ConfigError("data.loader.order=node needs data.loader.canonical_nodes: a constant of the run "
                              "(keep it when resizing), e.g. the number of nodes it starts on")
        self.source, self.cfg, self.epoch, self.G = source, cfg, epoch, global_batch
        self.order = NodeOrder(source.main_counts, source.main_ids, cfg.shuffle_block, cfg.seed, epoch,
                               cfg.canonical_nodes, global_batch, cfg.p_hr)

    @property
    def slots(self) -> int:
        return self.order.batches * self.G

    def rank_slots(self, start: int, rank: int, world_size: int, ranks_per_node: int) -> list[int]:
        if start % self.G:
            raise ConfigError(f"the position (slot {start}) is not at a global batch of {self.G}: "
                              "data.loader.order=node continues an epoch with the global batch it started with "
                              "(ranks x data.loader.batch_size)")
        return self.order.rank_slots(start // self.G, rank, world_size, ranks_per_node)

    def is_hr(self, g: int) -> bool:
        return self.order.is_hr(g)

    def main_picks(self, g: int) -> Iterator[int]:
        c, t = self.order.locate(g)
        part = self.order.part(c)
        position = self.order.plans[c].main_position(t)
        for k in range(RETRIES):
            yield int(part.sample_id((position + k) % part.total))

    def hr_picks(self, g: int) -> Iterator[int]:
        rng = epoch_rng(self.cfg.seed, self.epoch, HR_PICK, g)
        window = self.order.window_shards(g)
        counts = self.source.hr_counts(window)
        for _ in range(RETRIES):
            if counts.sum() == 0:
                yield self.source.hr_id(int(rng.integers(self.source.hr_size)))
                continue
            shard = int(window[rng.choice(len(window), p=counts / counts.sum())])
            ids = self.source.hr_ids_of(shard)
            yield int(ids[rng.integers(len(ids))])


def resolve_order(cfg, source, nodes: int):
    """cfg with `order: auto` and `canonical_nodes: 0` decided for a run of `nodes` physical nodes: the node
    order for indexed shards on object storage (a node then reads only its partition, what the node shard
    cache needs), the global order otherwise; canonical nodes: the node count of the run that starts the
    epoch (a resumed run takes the checkpoint's, see Loader.load_state_dict)."""
    order = cfg.order
    if order == "auto":
        urls = getattr(source, "urls", None) or []
        order = "node" if source.size is not None and urls and urls[0].startswith("s3://") else "global"
    return replace(cfg, order=order, canonical_nodes=cfg.canonical_nodes or (nodes if order == "node" else 0))


def epoch_order(source, cfg, epoch: int, global_batch: int) -> GlobalOrder | NodeEpochOrder:
    if cfg.order not in ORDERS:
        raise ConfigError(f"config key 'data.loader.order' = {cfg.order!r}: use one of {', '.join(ORDERS)}")
    return (GlobalOrder if cfg.order == "global" else NodeEpochOrder)(source, cfg, epoch, global_batch)
