"""The data path at LAION scale, simulated with this repository's own order and cache code: what 1000 GPUs
ask of object storage, how well a global batch is shuffled, and how much of the job a slow GET costs.

A synthetic index (no files): --shards shards of --shard-samples samples, a fraction --hr-frac of them
high-res (--hr-mb each, the rest --main-mb, back to back in the shard), drawn per shard with (seed, shard).
The epoch's order is `SlotPlan`, `BlockOrder` and `NodeOrder` (infd/data/) exactly as the loader builds
them, at the configured `shuffle_block`; the high-res draws are the loader's (`HR_PICK` keyed by slot).
Every figure below is computed from those orders; nothing is fitted.

Three modes, side by side:
  old          the global block shuffle, one GET per sample, no hedging, a 60 s read timeout;
  sample       the node order (--canonical-nodes, one physical node each), one GET per sample, hedged
               reads (`hedge_after_s`, `request_timeout_s`): data.loader.read_mode=sample;
  shard_cache  the node order read through a node's shard cache of --cache-gb (the first value gives
               the headline figures; the others show what a smaller cache costs) in chunks of
               --cache-chunk-mb: canonical node 0's reads of a whole epoch (its main stream block by block,
               its high-res draws from the current block's shards, interleaved evenly) run through the
               cache model (infd/data/cache_model.py, an LRU of chunks), scaled by the node count.

Figures per mode:
  requests   GET/s in all, on the busiest shard (and, per sample, on the busiest of --prefixes prefixes,
             shard i on prefix i mod --prefixes), object-store bytes per epoch over the dataset's size,
             mean MB per GET; for the cache also its miss rate, the largest bytes of the shards one block
             spans (what the cache must hold: docs/data.md) and a node's peak GET rate over a minute;
  shuffle    distinct shards in a global batch (the whole batch at --p-hr, its main half, and the whole
             batch at p_hr 0), same-shard pair odds against a perfect shuffle (two samples of one batch
             drawn from one shard), and the share of a batch's shards the next batch reads again;
  stalls     job efficiency (ideal time over simulated time) when a GET is slow with probability q
             (0.5-3 s extra) for q in 1e-5, 1e-4, 1e-3, and separately with one hang of 60 s per 10^6 GETs:
             every rank's workers build batches ahead (DataLoader: `prefetch_factor` batches per worker
             requested ahead), each batch takes --batch-s plus its slowest read, and each step waits for
             the slowest rank (synchronous data parallelism). A hedged GET that has not answered after its
             delay is sent again (a fresh latency); a hung one fails at the request timeout and is retried.
             With the cache a read is local (--local-read-s) or, at the simulated miss rate of that step
             (the epoch's first --sim-steps steps, cold cache included), a chunk GET: latency plus the chunk
             at --conn-mb-s, hedged after `hedge_after_s` plus its size at 50 MB/s (as the loader does).

    python benchmarks/data_at_scale.py                # the defaults: 100M samples, 1000 GPUs (about a minute)

Last line: JSON with the shard_cache headline figures at the top level (bytes_per_dataset, mean_get_mb,
main_shards_per_batch, shards_per_batch_phr0, same_shard_odds, efficiency_q1e-3, efficiency_hangs),
every mode's figures and the assumptions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.data.cache_model import simulate  # noqa: E402
from infd.data.epoch_plan import BlockOrder, SlotPlan, epoch_rng  # noqa: E402
from infd.data.shard_cache import HEDGE_FLOOR_BYTES_PER_S  # noqa: E402
from infd.data.orders import HR_PICK  # noqa: E402
from infd.data.node_order import NodeOrder  # noqa: E402

SLOW_RATES = (1e-5, 1e-4, 1e-3)
# shard_cache mode's figures also at the top level of the JSON line (issue 26's acceptance)
HEADLINE = ("bytes_per_dataset", "mean_get_mb", "main_shards_per_batch", "shards_per_batch_phr0", "same_shard_odds",
            "efficiency_q1e-3", "efficiency_hangs")


class SyntheticIndex:
    """Which samples are high-res, per shard, drawn lazily with (seed, shard): nothing is held per sample."""

    def __init__(self, args):
        self.args, self.n = args, args.shard_samples
        rng = np.random.default_rng([args.seed, 0])
        self.hr_counts = rng.binomial(self.n, args.hr_frac, args.shards)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def hr_mask(self, shard: int) -> np.ndarray:
        mask = np.zeros(self.n, bool)
        picks = np.random.default_rng([self.args.seed, 1, shard]).choice(self.n, self.hr_counts[shard], replace=False)
        mask[picks] = True
        return mask

    def main_ids(self, shard: int, exclude_hr: bool) -> np.ndarray:
        keep = ~self.hr_mask(shard) if exclude_hr else np.ones(self.n, bool)
        return shard * self.n + np.flatnonzero(keep)

    def layout(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """First and end byte of each sample of a shard (members back to back; tar headers ignored)."""
        if shard not in self._layouts:
            sizes = np.where(self.hr_mask(shard), self.args.hr_mb, self.args.main_mb) * 1e6
            ends = np.cumsum(sizes).astype(np.int64)
            self._layouts[shard] = (ends - sizes.astype(np.int64), ends)
            if len(self._layouts) > 256:
                self._layouts.pop(next(iter(self._layouts)))
        return self._layouts[shard]

    @property
    def shard_bytes(self) -> np.ndarray:
        a = self.args
        return ((self.n - self.hr_counts) * a.main_mb * 1e6 + self.hr_counts * a.hr_mb * 1e6).astype(np.int64)

    def hr_shard(self, k: int) -> int:
        """The shard of the k-th high-res sample (high-res samples numbered shard after shard)."""
        return int(np.searchsorted(np.cumsum(self.hr_counts), k, side="right"))


def batch_shards(index: SyntheticIndex, args, p_hr: float, batch: int, kind: str, epoch: int = 0) -> tuple[list, list]:
    """(shards of the main slots, shards of the high-res slots) of global batch `batch`, in order `kind`:
    "global" (the loader's block shuffle today) or "node" (infd/data/node_order.py)."""
    exclude = p_hr > 0
    counts = index.n - index.hr_counts if exclude else np.full(args.shards, index.n)
    ids = lambda i: index.main_ids(i, exclude)  # noqa: E731
    slots = range(batch * args.global_batch, (batch + 1) * args.global_batch)
    main, hr = [], []
    if kind == "node":
        order = NodeOrder(counts, ids, args.shuffle_block, args.seed, epoch, args.canonical_nodes,
                          args.global_batch, p_hr)
        for g in slots:
            if order.is_hr(g):  # a high-res sample of the shards the node's current block covers
                window = order.window_shards(g)
                hr.append(int(window[epoch_rng(args.seed, epoch, HR_PICK, g).integers(len(window))]))
            else:
                main.append(order.main_sample(g) // index.n)
        return main, hr
    order = BlockOrder(counts, ids, args.shuffle_block, args.seed, epoch)
    plan = SlotPlan(p_hr, int(counts.sum()), args.seed, epoch)
    hr_total = int(index.hr_counts.sum())
    for g in slots:
        if plan.is_hr(g):
            k = int(epoch_rng(args.seed, epoch, HR_PICK, g).integers(hr_total))
            hr.append(index.hr_shard(k))
        else:
            main.append(order.sample_id(plan.main_position(g)) // index.n)
    return main, hr


def pair_odds(shards: list, n_shards: int) -> float:
    """P(two samples of the batch share a shard) over a perfect shuffle's (about 1 / n_shards)."""
    _, counts = np.unique(shards, return_counts=True)
    n = len(shards)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)) * n_shards) if n > 1 else 0.0


def shuffle_figures(index: SyntheticIndex, args, kind: str) -> dict:
    rng = np.random.default_rng(args.seed)
    batches = sorted(rng.choice(1000, args.batches_sampled, replace=False).tolist())
    whole, main_half, phr0, odds, reuse = [], [], [], [], []
    for b in batches:
        main, hr = batch_shards(index, args, args.p_hr, b, kind)
        nxt, _ = batch_shards(index, args, args.p_hr, b + 1, kind)
        whole.append(len(set(main) | set(hr)))
        main_half.append(len(set(main)))
        odds.append(pair_odds(main, args.shards))
        reuse.append(len(set(main) & set(nxt)) / max(1, len(set(main))))
        zero, _ = batch_shards(index, args, 0.0, b, kind)
        phr0.append(len(set(zero)))
    return {"shards_per_batch": float(np.mean(whole)), "main_shards_per_batch": float(np.mean(main_half)),
            "shards_per_batch_phr0": float(np.mean(phr0)), "same_shard_odds": float(np.mean(odds)),
            "next_batch_reuse": float(np.mean(reuse)), "batches_sampled": batches}


def request_figures(index: SyntheticIndex, args, kind: str) -> dict:
    gets_per_s = args.gpus * args.samples_per_gpu_s
    main, hr = batch_shards(index, args, args.p_hr, 7, kind)
    shards = np.array(main + hr)
    steps_per_s = gets_per_s / args.global_batch
    busiest_shard = np.unique(shards, return_counts=True)[1].max() * steps_per_s
    busiest_prefix = np.bincount(shards % args.prefixes, minlength=args.prefixes).max() * steps_per_s
    n_hr = int(index.hr_counts.sum())
    n_main = args.shards * index.n - n_hr
    dataset_mb = n_hr * args.hr_mb + n_main * args.main_mb
    hr_reads = n_main * args.p_hr / (1 - args.p_hr)  # high-res slots of an epoch that reads every main sample once
    read_mb = n_main * args.main_mb + hr_reads * args.hr_mb
    return {"gets_per_s": gets_per_s, "busiest_shard_gets_per_s": float(busiest_shard),
            "busiest_prefix_gets_per_s": float(busiest_prefix), "bytes_per_dataset": read_mb / dataset_mb,
            "mean_get_mb": read_mb / (n_main + hr_reads), "gets_per_epoch": n_main + hr_reads,
            "dataset_tb": dataset_mb / 1e6, "read_tb_per_epoch": read_mb / 1e6}


def one_get(rng, shape, args, slow_rate: float, hang_rate: float, timeout_s: float) -> np.ndarray:
    """Seconds until one GET's answer starts: gamma latency, sometimes slow (0.5-3 s more), sometimes hung
    (then failed at the timeout and retried)."""
    t = rng.gamma(4.0, args.get_s / 4.0, shape)
    t += np.where(rng.random(shape) < slow_rate, rng.uniform(0.5, 3.0, shape), 0.0)
    hung = rng.random(shape) < hang_rate
    return np.where(hung, np.minimum(60.0, timeout_s) + rng.gamma(4.0, args.get_s / 4.0, shape), t)


def get_latency(rng, shape, args, slow_rate: float, hang_rate: float, hedge_after_s: float,
                timeout_s: float, transfer_s: float = 0.0) -> np.ndarray:
    """Seconds until each GET's bytes are in hand (transfer_s: moving them); hedged: the earlier of the first
    and a second sent after hedge_after_s."""
    first = one_get(rng, shape, args, slow_rate, hang_rate, timeout_s) + transfer_s
    if hedge_after_s <= 0:
        return first
    second = hedge_after_s + one_get(rng, shape, args, slow_rate, hang_rate, timeout_s) + transfer_s
    return np.where(first > hedge_after_s, np.minimum(first, second), first)


def efficiency(args, slow_rate: float, hang_rate: float, hedge_after_s: float, timeout_s: float,
               miss_rates: np.ndarray | None = None) -> float:
    """Ideal over simulated time of --sim-steps synchronous steps of --gpus ranks (see the docstring).
    miss_rates: the shard cache's, per step (a sample read waits for a chunk GET with that probability,
    else reads local disk); None: every sample is its own GET."""
    rng = np.random.default_rng([args.seed, int(slow_rate * 1e9), int(hang_rate * 1e9)])
    ranks, workers, ahead = args.gpus, args.workers, args.workers * args.prefetch
    per_rank = args.global_batch // args.gpus
    step_s = args.global_batch / (args.gpus * args.samples_per_gpu_s)
    steps = args.sim_steps
    consumed = np.zeros(steps)  # when step j's batch was taken (every rank at once)
    finish = np.zeros((steps, ranks))
    t = 0.0
    for j in range(steps):
        requested = consumed[j - ahead] if j >= ahead else 0.0
        worker_free = finish[j - workers] if j >= workers else np.zeros(ranks)
        start = np.maximum(requested, worker_free)
        if miss_rates is None:
            latency = get_latency(rng, (ranks, per_rank), args, slow_rate, hang_rate, hedge_after_s, timeout_s)
        else:
            latency = cache_latency(rng, (ranks, per_rank), args, miss_rates[j % len(miss_rates)], slow_rate,
                                    hang_rate, hedge_after_s, timeout_s)
        slowest = latency.max(1)
        finish[j] = start + args.batch_s + slowest
        t = max(t + step_s, finish[j].max())
        consumed[j] = t
    ideal = steps * step_s + (args.batch_s + args.get_s)  # the first batch's wait is unavoidable
    return ideal / t


def cache_latency(rng, shape, args, miss_rate: float, slow_rate: float, hang_rate: float, hedge_after_s: float,
                  timeout_s: float) -> np.ndarray:
    """A sample read through the node cache: local disk, or (probability miss_rate) a chunk GET: the
    GET's latency plus the chunk at --conn-mb-s, hedged after the loader's delay for its size
    (infd/data/shard_cache.py)."""
    transfer = args.cache_chunk_mb * 1.048576 / args.conn_mb_s
    chunk_hedge = hedge_after_s + args.cache_chunk_mb * 1.048576e6 / HEDGE_FLOOR_BYTES_PER_S if hedge_after_s else 0.0
    get = get_latency(rng, shape, args, slow_rate, hang_rate, chunk_hedge, timeout_s, transfer)
    return np.where(rng.random(shape) < miss_rate, get, args.local_read_s)


def stall_figures(args, hedge_after_s: float, timeout_s: float, miss_rates: np.ndarray | None = None) -> dict:
    out = {f"efficiency_q{q:.0e}".replace("e-0", "e-"): efficiency(args, q, 0.0, hedge_after_s, timeout_s, miss_rates)
           for q in SLOW_RATES}
    out["efficiency_hangs"] = efficiency(args, 0.0, 1e-6, hedge_after_s, timeout_s, miss_rates)
    return out


def node_reads(index: SyntheticIndex, args, node: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One canonical node's reads of an epoch, in order: (sample id, is high-res, the largest bytes of the
    shards one block spans), its main stream (the
    loader's node order, block by block) interleaved evenly with its high-res draws from the shards of the
    current block (a shard weighted by its high-res count, then a high-res sample uniformly, as
    infd/data/orders.py draws them)."""
    counts = index.n - index.hr_counts
    order = NodeOrder(counts, lambda i: index.main_ids(i, True), args.shuffle_block, args.seed, 0,
                      args.canonical_nodes, args.global_batch, args.p_hr)
    part = order.part(node)
    rng = np.random.default_rng([args.seed, 7, node])
    ids, flags, windows = [], [], []
    for k in range(-(-part.total // args.shuffle_block)):
        main = part.block_ids(k)
        window = part.block_shards(k * args.shuffle_block)
        windows.append(float(index.shard_bytes[window].sum()))
        weights = index.hr_counts[window].astype(np.float64)
        n_hr = int(round(len(main) * args.p_hr / (1 - args.p_hr)))
        shards = rng.choice(window, n_hr, p=weights / weights.sum())
        hr = np.empty(n_hr, np.int64)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            hr[where] = shard * index.n + rng.choice(np.flatnonzero(index.hr_mask(int(shard))), len(where))
        both = np.concatenate([main, hr])
        at = np.concatenate([(np.arange(len(main)) + 0.5) / len(main), (np.arange(n_hr) + 0.5) / max(n_hr, 1)])
        pick = np.argsort(at, kind="stable")
        ids.append(both[pick])
        flags.append(np.arange(len(both))[pick] >= len(main))
    return np.concatenate(ids), np.concatenate(flags), max(windows)


def cache_figures(index: SyntheticIndex, args, cache_gb: float) -> dict:
    """The shard cache of canonical node 0 over a whole epoch (infd/data/cache_model.py), scaled to the job
    (every canonical node reads an equal share); a physical node per canonical node."""
    ids, _, block_bytes = node_reads(index, args, 0)
    shards = ids // index.n

    def spans():
        for sid, shard in zip(ids.tolist(), shards.tolist()):
            starts, ends = index.layout(shard)
            yield shard, int(starts[sid % index.n]), int(ends[sid % index.n])

    chunk = args.cache_chunk_mb << 20
    figures = simulate(spans(), index.shard_bytes, chunk, int(cache_gb * 1e9))
    node_rate = args.gpus_per_node * args.samples_per_gpu_s  # sample reads per second per node
    epoch_s = figures.reads / node_rate
    dataset = float(index.shard_bytes.sum())
    per_batch = args.global_batch // args.canonical_nodes
    steps = figures.missed[: per_batch * args.sim_steps].reshape(-1, per_batch).mean(1)
    fills_at = np.flatnonzero(figures.missed) / node_rate  # a read's time in the epoch, s
    busiest = np.bincount(shards[figures.missed] * int(epoch_s + 1) + fills_at.astype(np.int64)).max()
    window = np.convolve(figures.missed, np.ones(int(node_rate * 60)), "valid").max() / 60  # per s, 1 min
    return {"cache_gb_per_node": cache_gb, "block_shards_gb": block_bytes / 1e9, "chunk_mb": args.cache_chunk_mb,
            "gets_per_s": figures.gets * args.canonical_nodes / epoch_s,
            "busiest_shard_gets_per_s": float(busiest), "peak_node_gets_per_s_1min": float(window),
            "peak_node_gbit_s_1min": float(window * chunk * 8 / 1e9),
            "bytes_per_dataset": figures.get_bytes * args.canonical_nodes / dataset,
            "mean_get_mb": figures.get_bytes / figures.gets / 2**20,
            "gets_per_epoch": figures.gets * args.canonical_nodes,
            "miss_rate": figures.gets / figures.reads, "node_reads_per_epoch": figures.reads,
            "miss_rate_first_steps": float(steps.mean())}, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--shard-samples", type=int, default=10_000)
    p.add_argument("--hr-frac", type=float, default=0.2)
    p.add_argument("--hr-mb", type=float, default=1.5)
    p.add_argument("--main-mb", type=float, default=0.15)
    p.add_argument("--gpus", type=int, default=1000)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--workers", type=int, default=8, help="loader workers per GPU")
    p.add_argument("--prefetch", type=int, default=2, help="prefetch_factor")
    p.add_argument("--global-batch", type=int, default=2000)
    p.add_argument("--samples-per-gpu-s", type=float, default=20.0)
    p.add_argument("--p-hr", type=float, default=0.5)
    p.add_argument("--shuffle-block", type=int, default=262_144)
    p.add_argument("--canonical-nodes", type=int, default=125, help="the node order's partitions")
    p.add_argument("--prefixes", type=int, default=64)
    p.add_argument("--get-s", type=float, default=0.05, help="mean GET latency (gamma, shape 4)")
    p.add_argument("--batch-s", type=float, default=0.3, help="a worker's decode and crop time per batch")
    p.add_argument("--hedge-after-s", type=float, default=0.3)
    p.add_argument("--request-timeout-s", type=float, default=10.0)
    p.add_argument("--cache-gb", type=float, nargs="+", default=[200.0, 100.0],
                   help="shard cache per node (the first: the headline figures)")
    p.add_argument("--cache-chunk-mb", type=int, default=16, help="data.loader.cache_chunk_mb")
    p.add_argument("--conn-mb-s", type=float, default=100.0, help="one GET connection's transfer rate")
    p.add_argument("--local-read-s", type=float, default=0.002, help="a sample read from the node's disk")
    p.add_argument("--sim-steps", type=int, default=10_000)
    p.add_argument("--batches-sampled", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    if args.gpus != args.canonical_nodes * args.gpus_per_node:
        p.error("the shard cache figures assume one physical node per canonical node: "
                "--gpus = --canonical-nodes x --gpus-per-node")
    index = SyntheticIndex(args)
    shuffle = {kind: shuffle_figures(index, args, kind) for kind in ("global", "node")}
    requests = {kind: request_figures(index, args, kind) for kind in ("global", "node")}
    print("shuffle:", json.dumps(shuffle), "\nrequests:", json.dumps(requests), flush=True)
    caches = {}
    for gb in args.cache_gb:
        caches[gb] = cache_figures(index, args, gb)
        print(f"shard_cache {gb:g} GB:", json.dumps(caches[gb][0]), flush=True)
    cache, miss_rates = caches[args.cache_gb[0]]
    modes = {"old": {**requests["global"], **shuffle["global"], **stall_figures(args, 0.0, 60.0)},
             "sample": {**requests["node"], **shuffle["node"],
                        **stall_figures(args, args.hedge_after_s, args.request_timeout_s)},
             "shard_cache": {**cache, **shuffle["node"],
                             **stall_figures(args, args.hedge_after_s, args.request_timeout_s, miss_rates)}}
    for name, figures in modes.items():
        print(f"{name}:", json.dumps({k: v for k, v in figures.items() if k != "batches_sampled"}), flush=True)
    headline = {key: modes["shard_cache"][key] for key in HEADLINE}
    result = {**headline, "assumptions": vars(args), "modes": modes,
              "shard_cache_sizes": {str(gb): figures for gb, (figures, _) in caches.items()},
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
