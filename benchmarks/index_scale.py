"""What opening a web-scale index costs each process, against the old Python-dict representation.

A synthetic sample index of --samples entries (half of them high-res) in --shards shards is
written once (arrays only: the tars do not exist, no image is read). Then, each in a fresh
process: the loader's source opens it and plans an epoch (ShardSource + Loader, p_hr = 0.5,
2 ranks x 8 per batch), yields 1000 main-stream plans (the first positions of the epoch's block
shuffle, with offsets and sizes) and 1000 high-res plans, in the main process and in one
DataLoader worker; RSS growth and time are measured around that, and the time to find the
sample at 10% and at 90% of an epoch (what a resume costs the order: constant).

The baseline is the representation this replaced (index v1): the high-res manifest as one Python
dict per entry plus a set of (shard, key) for filtering the main stream, built at --baseline
entries in a fresh process and extrapolated linearly to the high-res count (said so in the output).

    python benchmarks/index_scale.py [--samples 10000000 --shards 20000 --baseline 1000000]

Last line: JSON with entries, open_s and rss_mb (main, worker) for the index, and the baseline's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.data.sample_index import HR, SAMPLE_DTYPE, SHARD_DTYPE, write_index  # noqa: E402


def write_synthetic(root: Path, n: int, n_shards: int) -> None:
    per = n // n_shards
    samples = np.zeros(per * n_shards, SAMPLE_DTYPE)
    idx = np.arange(len(samples))
    samples["shard"] = idx // per
    samples["offset"] = (idx % per) * 200_000 + 1024
    samples["size"] = 150_000
    samples["width"], samples["height"] = 1500, 1100
    samples["flags"] = np.where(idx % 2 == 0, HR, 0)  # half high-res
    shards = np.zeros(n_shards, SHARD_DTYPE)
    shards["first"] = np.arange(n_shards) * per
    shards["samples"], shards["hr"], shards["bytes"] = per, per // 2, per * 200_000
    meta = {"hr_threshold": 1024, "exts": ["jpg"], "shards": [f"shard-{i:06d}.tar" for i in range(n_shards)],
            "skipped": {}, "resolution_histogram": {"edges": [0], "counts": [len(samples)]}}
    write_index(root, meta, shards, samples, [])  # keys written below, without a Python object per key
    digits = (idx[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")
    digits.astype(np.uint8).tofile(root / "keys.bin")
    np.save(root / "key_offsets.npy", np.arange(len(samples) + 1, dtype=np.int64) * 9)


PROBE = r'''
import json, sys, time, psutil, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from torch.utils.data import DataLoader, IterableDataset
from infd.config import from_mapping
from infd.data.loader import DataConfig, Loader
from infd.data.shard_source import ShardSource

def rss():
    return psutil.Process().memory_info().rss / 2**20

def plans(source):
    """1000 main-stream plans (the first positions of epoch 0: sample offsets and sizes) and 1000
    high-res ones; plus the time to find the samples at 10% and 90% of the epoch (a resume)."""
    order = source.order(0, 0, 262_144)
    out = []
    for pos in range(1000):
        rec = source.index.record(order.sample_id(pos)); out.append((int(rec["offset"]), int(rec["size"])))
    rng = np.random.default_rng(0)
    for _ in range(1000):
        sid = source.hr_id(int(rng.integers(source.hr_size))); rec = source.index.record(sid)
        out.append((source.url_of[int(rec["shard"])], int(rec["offset"]), int(rec["size"]), source.index.key(sid)))
    seek = {}
    for frac in (0.1, 0.9):
        t = time.perf_counter(); source.order(0, 1, 262_144).sample_id(int(frac * source.size))
        seek[f"seek_s_{int(frac * 100)}"] = round(time.perf_counter() - t, 3)
    return len(out), seek

class Probe(IterableDataset):
    def __init__(self, ds): self.ds = ds
    def __iter__(self):
        before = rss(); n, _ = plans(self.ds); yield {"n": n, "rss_before": before, "rss_after": rss()}

base = rss(); t = time.perf_counter()
cfg = from_mapping(DataConfig, {"shards": sys.argv[2], "index": sys.argv[3], "p_hr": 0.5, "num_workers": 2,
                                "batch_size": 8})
ds = ShardSource(cfg, None, None)
n_batches = Loader(ds, cfg, rank=0, world_size=2).batches_per_epoch
n, seek = plans(ds)
open_s = time.perf_counter() - t
main = rss() - base
worker = next(iter(DataLoader(Probe(ds), batch_size=None, num_workers=1)))
print(json.dumps({"open_s": round(open_s, 2), "rss_mb_main": round(main, 1),
                  "rss_mb_worker": round(worker["rss_after"] - worker["rss_before"], 1), "plans": n,
                  "batches_per_epoch": n_batches} | seek))
'''

BASELINE = r'''
import json, sys, time, psutil
n = int(sys.argv[1])
base = psutil.Process().memory_info().rss / 2**20
t = time.perf_counter()
lines = [json.dumps({"shard": f"shard-{i // 500:06d}.tar", "key": f"{i:09d}", "ext": "jpg", "offset": i * 200000,
                     "size": 150000, "width": 1500, "height": 1100, "caption": "a photo of something"})
         for i in range(n)]
text = "\n".join(lines); del lines
t = time.perf_counter()
manifest = [json.loads(line) | {"url": "s3://bucket/set/" + json.loads(line)["shard"]} for line in text.splitlines()]
keys = {(e["url"], e["key"]) for e in manifest}
del text
print(json.dumps({"open_s": round(time.perf_counter() - t, 2),
                  "rss_mb": round(psutil.Process().memory_info().rss / 2**20 - base, 1)}))
'''


def run(code: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=20_000)
    p.add_argument("--baseline", type=int, default=1_000_000, help="high-res entries of the v1 baseline")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "index"
        t = time.perf_counter()
        write_synthetic(root, args.samples, args.shards)
        print(f"synthetic index: {args.samples} samples, {args.shards} shards, written in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        shards = f"s3://bucket/set/shard-{{000000..{args.shards - 1:06d}}}.tar"
        new = run(PROBE, str(ROOT), shards, str(root))
    old = run(BASELINE, str(args.baseline))
    hr = args.samples // 2
    scale = hr / args.baseline
    old_10m = {"open_s": round(old["open_s"] * scale, 1), "rss_mb": round(old["rss_mb"] * scale, 1)}
    print(f"sample index, {args.samples} entries ({hr} high-res): open + plan {new['open_s']} s, "
          f"RSS +{new['rss_mb_main']} MB main, +{new['rss_mb_worker']} MB worker; finding the sample at "
          f"10% / 90% of an epoch: {new['seek_s_10']} / {new['seek_s_90']} s")
    print(f"v1 dict manifest, {args.baseline} high-res entries measured: {old['open_s']} s, +{old['rss_mb']} MB; "
          f"extrapolated to {hr}: {old_10m['open_s']} s, +{old_10m['rss_mb']} MB per process")
    print(json.dumps({"entries": args.samples, "hr_entries": hr, "shards": args.shards, "index": new,
                      "v1_measured": {"hr_entries": args.baseline, **old},
                      "v1_extrapolated": {"hr_entries": hr, **old_10m, "note": "linear extrapolation"}}))


if __name__ == "__main__":
    main()
