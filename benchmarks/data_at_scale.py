"""The data path at LAION scale, simulated with this repository's own order code: what 1000 GPUs ask
of object storage, how well a global batch is shuffled, and how much of the job a slow GET costs.

A synthetic index (no files): --shards shards of --shard-samples samples, a fraction --hr-frac of them
high-res (--hr-mb each, the rest --main-mb), drawn per shard with (seed, shard). The epoch's order is
`SlotPlan` and `BlockOrder` (infd/data/epoch_plan.py) exactly as the loader builds it, at the configured
`shuffle_block`; the high-res draws are the loader's (`HR_PICK` keyed by slot). Every figure below is
computed from those orders; nothing is fitted.

Per mode (`sample`: one GET per sample, as the loader reads today; hedging on or off):
  requests   GET/s in all, on the busiest shard and on the busiest of --prefixes prefixes (shard i on
             prefix i mod --prefixes), object-store bytes per epoch over the dataset's size, mean MB per GET;
  shuffle    distinct shards in a global batch (the whole batch at --p-hr, its main half, and the whole
             batch at p_hr 0), same-shard pair odds against a perfect shuffle (two samples of one batch
             drawn from one shard), and the share of a batch's shards the next batch reads again; for the
             global block shuffle the loader uses and for the node-partitioned order (infd/data/node_order.py,
             --canonical-nodes; high-res draws from the shards of the node's current block);
  stalls     job efficiency (ideal time over simulated time) when a GET is slow with probability q
             (0.5-3 s extra) for q in 1e-5, 1e-4, 1e-3, and separately with one hang of 60 s per 10^6 GETs:
             every rank's workers build batches ahead (DataLoader: `prefetch_factor` batches per worker
             requested ahead), each batch takes --batch-s plus its slowest GET, and each step waits for the
             slowest rank (synchronous data parallelism). A hedged GET that has not answered after
             `hedge_after_s` is sent again (a fresh latency); a hung one fails at the request timeout and is
             retried.

    python benchmarks/data_at_scale.py                # the defaults: 100M samples, 1000 GPUs (about 30 s)

Last line: JSON of every figure per mode, with the assumptions. The `shard_cache` mode (issue 26) is not
built yet.
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

from infd.data.epoch_plan import BlockOrder, SlotPlan, epoch_rng  # noqa: E402
from infd.data.orders import HR_PICK  # noqa: E402
from infd.data.node_order import NodeOrder  # noqa: E402

SLOW_RATES = (1e-5, 1e-4, 1e-3)


class SyntheticIndex:
    """Which samples are high-res, per shard, drawn lazily with (seed, shard): nothing is held per sample."""

    def __init__(self, args):
        self.args, self.n = args, args.shard_samples
        rng = np.random.default_rng([args.seed, 0])
        self.hr_counts = rng.binomial(self.n, args.hr_frac, args.shards)

    def hr_mask(self, shard: int) -> np.ndarray:
        mask = np.zeros(self.n, bool)
        picks = np.random.default_rng([self.args.seed, 1, shard]).choice(self.n, self.hr_counts[shard], replace=False)
        mask[picks] = True
        return mask

    def main_ids(self, shard: int, exclude_hr: bool) -> np.ndarray:
        keep = ~self.hr_mask(shard) if exclude_hr else np.ones(self.n, bool)
        return shard * self.n + np.flatnonzero(keep)

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


def request_figures(index: SyntheticIndex, args) -> dict:
    gets_per_s = args.gpus * args.samples_per_gpu_s
    main, hr = batch_shards(index, args, args.p_hr, 7, "global")
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


def get_latency(rng, shape, args, slow_rate: float, hang_rate: float, hedge_after_s: float,
                timeout_s: float) -> np.ndarray:
    """Seconds until each GET's bytes are in hand (hedged: min of the first and, after the delay, a second)."""
    def one(size):
        t = rng.gamma(4.0, args.get_s / 4.0, size)
        t += np.where(rng.random(size) < slow_rate, rng.uniform(0.5, 3.0, size), 0.0)
        hung = rng.random(size) < hang_rate
        return np.where(hung, np.minimum(60.0, timeout_s) + rng.gamma(4.0, args.get_s / 4.0, size), t)

    first = one(shape)
    if hedge_after_s <= 0:
        return first
    return np.where(first > hedge_after_s, np.minimum(first, hedge_after_s + one(shape)), first)


def efficiency(args, slow_rate: float, hang_rate: float, hedge_after_s: float, timeout_s: float) -> float:
    """Ideal over simulated time of --sim-steps synchronous steps of --gpus ranks (see the docstring)."""
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
        slowest = get_latency(rng, (ranks, per_rank), args, slow_rate, hang_rate, hedge_after_s, timeout_s).max(1)
        finish[j] = start + args.batch_s + slowest
        t = max(t + step_s, finish[j].max())
        consumed[j] = t
    ideal = steps * step_s + (args.batch_s + args.get_s)  # the first batch's wait is unavoidable
    return ideal / t


def stall_figures(args, hedge_after_s: float, timeout_s: float) -> dict:
    out = {f"efficiency_q{q:.0e}".replace("e-0", "e-"): efficiency(args, q, 0.0, hedge_after_s, timeout_s)
           for q in SLOW_RATES}
    out["efficiency_hangs"] = efficiency(args, 0.0, 1e-6, hedge_after_s, timeout_s)
    return out


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
    p.add_argument("--sim-steps", type=int, default=10_000)
    p.add_argument("--batches-sampled", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    index = SyntheticIndex(args)
    shuffle = {kind: shuffle_figures(index, args, kind) for kind in ("global", "node")}
    requests = request_figures(index, args)
    print("shuffle:", json.dumps(shuffle), "\nrequests:", json.dumps(requests), flush=True)
    modes = {"old_sample_unhedged": stall_figures(args, 0.0, 60.0),
             "sample_hedged": stall_figures(args, args.hedge_after_s, args.request_timeout_s)}
    for name, figures in modes.items():
        print(f"{name}:", json.dumps(figures), flush=True)
    result = {"assumptions": vars(args), "requests": requests, "shuffle": shuffle, "stalls": modes,
              "seconds": round(time.perf_counter() - start, 1),
              "not_built": ["shard_cache mode"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
