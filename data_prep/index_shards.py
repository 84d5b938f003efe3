"""Index existing WebDataset / img2dataset tars in place (read once, never rewritten).

    python -m data_prep.index_shards SHARDS --output INDEX_DIR [--hr-threshold 1024] [--workers 4]
    # across nodes: one part per SLURM array task or torchrun rank, then one merge
    python -m data_prep.index_shards SHARDS --output INDEX_DIR --part I --num-parts K
    python -m data_prep.index_shards SHARDS --output INDEX_DIR --num-parts K --merge

SHARDS: brace patterns, directories or s3:// prefixes (as data.loader.shards). Part I indexes the
I-th contiguous range of the sorted shard list into INDEX_DIR/parts/part-I-of-K (written under
.tmp and renamed, so a part that dies leaves nothing and is simply run again); --merge checks
that every part is there and writes the one index (infd/data/sample_index.py) into INDEX_DIR.
Without --part, one process does both.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from infd.data.histogram import HISTOGRAM_EDGES
from infd.data.sample_index import INDEX_NAME, SAMPLE_DTYPE, merge_indexes, shard_records, write_index
from infd.data.shard_scan import ShardScan, scan_shard
from infd.data.tar_samples import IMAGE_EXTS
from infd.data.urls import expand_urls
from infd.utils.in_process import InProcess
from infd.utils.process_main import run_as_process


def part_name(part: int, num_parts: int) -> str:
    return f"part-{part:05d}-of-{num_parts:05d}"


def part_range(n_shards: int, part: int, num_parts: int) -> tuple[int, int]:
    return n_shards * part // num_parts, n_shards * (part + 1) // num_parts


def build_index(urls: list[str], out: Path, hr_threshold: int, workers: int, primary: tuple[str, ...] = IMAGE_EXTS,
                extra_meta: dict | None = None, first_shard: int = 0, desc: str = "index") -> dict:
    """Scan `urls` (shards first_shard, first_shard+1, ... of the set) and write their index into
    `out`. Returns the index metadata."""
    scan = partial(scan_shard, hr_threshold=hr_threshold, primary=primary)
    scans: list[ShardScan] = []
    with pool(workers) as scanners:
        for result in tqdm(scanners.imap(scan, urls), total=len(urls), desc=desc, unit="shard"):
            scans.append(result)
    records = [s.records for s in scans]
    for shard_id, recs in enumerate(records, start=first_shard):
        recs["shard"] = shard_id
    samples = np.concatenate(records) if records else np.zeros(0, SAMPLE_DTYPE)
    skipped = sum((s.skipped for s in scans), Counter())
    histogram = np.sum([s.histogram for s in scans], axis=0).tolist() if scans else [0] * len(HISTOGRAM_EDGES)
    meta = {"hr_threshold": hr_threshold, "exts": list(primary), "shards": [u.rsplit("/", 1)[-1] for u in urls],
            "skipped": dict(skipped), **(extra_meta or {}),
            "resolution_histogram": {"edges": HISTOGRAM_EDGES, "counts": histogram, "of": "long side, upright"}}
    write_index(out, meta, shard_records(records, [s.bytes for s in scans]), samples,
                [k for s in scans for k in s.keys])
    return json.loads((out / INDEX_NAME).read_text())


def index_part(urls: list[str], out: Path, part: int, num_parts: int, hr_threshold: int, workers: int) -> Path:
    """Index this part's range of shards into out/parts/<part> (atomically); returns that directory."""
    final = out / "parts" / part_name(part, num_parts)
    if final.exists():
        print(f"{final.name} already done", flush=True)
        return final
    lo, hi = part_range(len(urls), part, num_parts)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_index(urls[lo:hi], tmp, hr_threshold, workers, first_shard=lo, desc=f"index {final.name}")
    tmp.rename(final)
    return final


def merge(out: Path, num_parts: int) -> dict:
    parts = [out / "parts" / part_name(i, num_parts) for i in range(num_parts)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise SystemExit(f"index_shards --merge: parts not finished: {', '.join(missing)}; run them (--part I) first")
    return merge_indexes(parts, out).meta


def pool(workers: int):
    return mp.get_context("spawn").Pool(workers) if workers > 1 else InProcess()


def add_part_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--part", type=int, help=f"{what} only this part (0-based) of the shards, then stop "
                   "(default: all parts)")
    p.add_argument("--num-parts", type=int, default=1, help="how many parts the shards are split into")
    p.add_argument("--merge", action="store_true", help="merge the finished parts' indexes into the index")


def check_part_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.num_parts < 1 or (args.part is not None and not 0 <= args.part < args.num_parts):
        p.error(f"--part must be in [0, --num-parts={args.num_parts})")
    return args


def build_parser() -> argparse.ArgumentParser:
    from infd.cli.common import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m data_prep.index_shards", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("shards", nargs="+", help="tar patterns, directories or s3:// prefixes")
    p.add_argument("--output", required=True, help="local index directory")
    p.add_argument("--hr-threshold", type=int, default=1024, help="long side (px, upright) of a high-res sample")
    p.add_argument("--workers", type=int, default=4, help="processes scanning shards in parallel")
    add_part_args(p, "index")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    return check_part_args(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    if args.merge:
        meta = merge(out, args.num_parts)
    else:
        urls = sorted(expand_urls(args.shards))
        if not urls:
            print(f"python -m data_prep.index_shards: error: {args.shards} matches no shard", file=sys.stderr)
            return 2
        if args.part is not None:
            index_part(urls, out, args.part, args.num_parts, args.hr_threshold, args.workers)
            return 0
        if args.num_parts == 1:
            meta = build_index(urls, out, args.hr_threshold, args.workers)
        else:
            for part in range(args.num_parts):
                index_part(urls, out, part, args.num_parts, args.hr_threshold, args.workers)
            meta = merge(out, args.num_parts)
    print(f"index: {meta['total_samples']} samples ({meta['total_hr']} high-res >= {meta['hr_threshold']} px, "
          f"{meta['total_excluded']} excluded: {meta['skipped']}) in {len(meta['shards'])} shards, "
          f"{meta['total_bytes'] / 2**20:.1f} MB -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_as_process(main))
