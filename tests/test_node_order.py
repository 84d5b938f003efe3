"""The node-partitioned order (infd/data/node_order.py): exactly once per epoch, the same global batches
at any world size, each rank reading only its node's canonical nodes, and config errors that name the key."""
import numpy as np
import pytest

from infd.config import ConfigError
from infd.data.node_order import NodeOrder

COUNTS = np.array([13, 7, 20, 9, 11, 16, 5, 19, 12, 8])  # main samples per shard
FIRST = np.concatenate([[0], np.cumsum(COUNTS)[:-1]])


def shard_ids(i: int) -> np.ndarray:
    return FIRST[i] + np.arange(COUNTS[i])


def order(p_hr: float = 0.0, canonical: int = 4, batch: int = 8, epoch: int = 0) -> NodeOrder:
    return NodeOrder(COUNTS, shard_ids, block=6, seed=3, epoch=epoch, canonical_nodes=canonical, global_batch=batch,
                     p_hr=p_hr)


def epoch_batches(o: NodeOrder, world: int, per_node: int) -> list[list[int]]:
    """Per global batch, the slots every rank builds, rank after rank."""
    return [[g for r in range(world) for g in o.rank_slots(k, r, world, per_node)] for k in range(o.batches)]


@pytest.mark.parametrize("p_hr", [0.0, 0.4])
def test_every_main_sample_of_the_epoch_appears_once(p_hr):
    o = order(p_hr)
    seen = [o.main_sample(g) for k in range(o.batches) for g in range(k * 8, k * 8 + 8) if not o.is_hr(g)]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(int(COUNTS.sum())))
    assert len(seen) >= COUNTS.sum() - 4 * 8  # at most a batch's worth per canonical node is left for the tail
    assert seen != sorted(seen)


@pytest.mark.parametrize("world, per_node", [(2, 2), (4, 1), (4, 2), (8, 1), (8, 4)])
def test_any_world_size_builds_the_same_global_batches_from_its_nodes_own_ranges(world, per_node):
    o = order(0.4)
    reference = [sorted(b) for b in epoch_batches(o, 1, 1)]
    batches = epoch_batches(o, world, per_node)
    assert [sorted(b) for b in batches] == reference
    nodes = world // per_node
    for k in range(o.batches):
        for r in range(world):
            node = r // per_node
            served = {c for c in range(4) if (c % nodes == node if 4 % nodes == 0 else c == node % 4)}
            assert {o.locate(g)[0] for g in o.rank_slots(k, r, world, per_node)} <= served


def test_a_global_batch_draws_from_every_canonical_nodes_block():
    o = order(0.0, canonical=4, batch=8)
    shards_of = np.repeat(np.arange(len(COUNTS)), COUNTS)
    for k in range(o.batches):
        nodes = {o.locate(g)[0] for g in range(k * 8, k * 8 + 8)}
        assert nodes == {0, 1, 2, 3}
        for g in range(k * 8, k * 8 + 8):
            assert shards_of[o.main_sample(g)] in o.window_shards(g)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="canonical_nodes' = 3 must divide the global batch"):
        order(canonical=3, batch=8)
    with pytest.raises(ConfigError, match="canonical_nodes' = 4 and 3 physical nodes"):
        order().rank_slots(0, 0, 6, 2)
