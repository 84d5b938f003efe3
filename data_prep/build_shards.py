"""Build mixed-resolution WebDataset shards and their index.

    python -m data_prep.build_shards --input SRC --output DST [--format folder|img2dataset|parquet]
        [--samples-per-shard 1000] [--workers N] [--min-side 256] [--max-pixels N] [--max-aspect 3]
        [--max-punsafe 0.5] [--max-pwatermark 0.8] [--min-aesthetic X] [--hr-threshold 1024]

DST is a directory or s3://bucket/prefix. Shard i holds job i (deterministic: sorted inputs);
a shard is finished when its stats file shard-XXXXXX.json exists, written after the tar is
complete, so re-running resumes: finished shards are kept, partial ones redone. The sample index
(infd/data/sample_index.py, as data_prep.index_shards writes it) is written last.

Across nodes: --part I --num-parts K builds and indexes the I-th contiguous range of shards (its
index under DST/parts/); --num-parts K --merge joins the parts' indexes without re-reading a shard.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from data_prep import sources
from data_prep.shard_writer import FilterConfig, ShardWriter
from data_prep.index_shards import add_part_args, build_index, check_part_args, part_name, part_range, pool
from infd.data.sample_index import FILES, INDEX_NAME, merge_indexes
from infd.data.urls import read_bytes
from infd.utils.process_main import run_as_process

log = logging.getLogger("data_prep.build_shards")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


class Destination:
    """A local directory, or an s3:// prefix staged through a local directory."""

    def __init__(self, url: str, staging: Path | None = None):
        self.url = url
        self.is_s3 = url.startswith("s3://")
        if self.is_s3:
            self.local = staging or Path(tempfile.mkdtemp(prefix="infd-shards-"))
        else:
            self.local = Path(url)
        self.local.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        if not self.is_s3:
            return (self.local / name).exists()
        from botocore.exceptions import ClientError

        from infd.data.urls import s3_client, split_s3

        bucket, prefix = split_s3(self.url.rstrip("/") + "/" + name)
        try:
            s3_client().head_object(Bucket=bucket, Key=prefix)
            return True
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise

    def read_text(self, name: str) -> str:
        if not self.is_s3:
            return (self.local / name).read_text()
        from infd.data.urls import read_bytes

        return read_bytes(self.url.rstrip("/") + "/" + name).decode()

    def publish(self, name: str) -> None:
        """Make a finished local file visible at the destination (S3: multipart upload, then delete)."""
        if not self.is_s3:
            return
        from boto3.s3.transfer import TransferConfig

        from infd.data.urls import s3_client, split_s3

        bucket, key = split_s3(self.url.rstrip("/") + "/" + name)
        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)
        s3_client().upload_file(str(self.local / name), bucket, key, Config=config)
        (self.local / name).unlink()


def build_one(args) -> dict:
    """Worker: write shard i from job, publish tar then stats. Returns the stats."""
    i, job, dest, cfg = args
    name = shard_name(i)
    writer = ShardWriter(dest.local / f"{name}.tar", cfg)
    for item in sources.job_items(job, writer.skip, writer.ignore):
        writer.add(item)
    stats = writer.close()
    dest.publish(f"{name}.tar")
    (dest.local / f"{name}.json").write_text(json.dumps(stats))
    dest.publish(f"{name}.json")  # last: its presence marks the shard finished
    return stats


def make_jobs(args) -> list[dict]:
    src = Path(args.input)
    if args.format == "folder":
        return sources.folder_jobs(src, args.samples_per_shard)
    if args.format == "img2dataset":
        return sources.img2dataset_jobs(src)
    return sources.parquet_jobs(src, args.samples_per_shard, args.path_column)


def detect_format(src: Path) -> str:
    if src.suffix == ".parquet" or (src.is_dir() and any(src.glob("*.parquet")) and not any(src.glob("*.tar"))):
        return "parquet"
    if src.is_dir() and any(src.glob("*.tar")):
        return "img2dataset"
    return "folder"


def build_stats(dest: Destination, shards: range, cfg: FilterConfig) -> dict:
    totals = {"skipped": Counter(), "converted": Counter(), "ignored": Counter()}
    for i in shards:
        stats = json.loads(dest.read_text(f"{shard_name(i)}.json"))
        for name, counts in totals.items():
            counts.update(stats.get(name, {}))
    return {"filters": asdict(cfg)} | {name: dict(counts) for name, counts in totals.items()}


def write_shard_index(dest: Destination, shards: range, cfg: FilterConfig, subdir: str = "") -> dict:
    """The sample index of built shards (the one index_shards writes) with the build's counts, in
    dest/subdir; the index.json goes last (it marks the index complete)."""
    urls = [dest.url.rstrip("/") + "/" + f"{shard_name(i)}.tar" for i in shards]
    local = dest.local / subdir
    meta = build_index(urls, local, cfg.hr_threshold, workers=1, first_shard=shards.start,
                       extra_meta={"build": build_stats(dest, shards, cfg)})
    for name in (*FILES[1:], FILES[0]):
        dest.publish(f"{subdir}/{name}" if subdir else name)
    return meta


def merge_parts(dest: Destination, n_shards: int, num_parts: int, cfg: FilterConfig) -> dict:
    """One index from the parts' indexes (each part indexed its own shards: nothing is re-read)."""
    names = [f"parts/{part_name(i, num_parts)}" for i in range(num_parts)]
    missing = [n for n in names if not dest.exists(f"{n}/{INDEX_NAME}")]
    if missing:
        raise SystemExit(f"build_shards --merge: parts not finished: {', '.join(missing)}; run them (--part I) first")
    if dest.is_s3:
        for name in names:
            (dest.local / name).mkdir(parents=True, exist_ok=True)
            for file in FILES:
                (dest.local / name / file).write_bytes(read_bytes(f"{dest.url.rstrip('/')}/{name}/{file}"))
    merge_indexes([dest.local / n for n in names], dest.local)
    meta = json.loads((dest.local / INDEX_NAME).read_text())
    meta["build"] = build_stats(dest, range(n_shards), cfg)
    (dest.local / INDEX_NAME).write_text(json.dumps(meta, indent=1))
    for name in (*FILES[1:], FILES[0]):
        dest.publish(name)
    return meta


def build(args) -> dict:
    cfg = FilterConfig(min_side=args.min_side, max_pixels=args.max_pixels, max_aspect=args.max_aspect,
                       max_punsafe=args.max_punsafe, max_pwatermark=args.max_pwatermark,
                       min_aesthetic=args.min_aesthetic, hr_threshold=args.hr_threshold, verify=not args.no_verify)
    args.format = args.format or detect_format(Path(args.input))
    jobs = make_jobs(args)
    dest = Destination(args.output, Path(args.staging) if args.staging else None)
    for tmp in dest.local.glob("*.tmp"):  # partial shards of an interrupted run
        tmp.unlink()
    if args.merge:
        return _report(merge_parts(dest, len(jobs), args.num_parts, cfg), dest, args)
    mine = range(*part_range(len(jobs), args.part, args.num_parts)) if args.part is not None else range(len(jobs))
    todo = [(i, jobs[i], dest, cfg) for i in mine if not dest.exists(f"{shard_name(i)}.json")]
    print(f"{len(mine)} shards from {args.input} ({args.format}); {len(mine) - len(todo)} already finished, "
          f"{len(todo)} to build with {args.workers} processes -> {args.output}", flush=True)
    bar = tqdm(total=len(todo), desc="shards", unit="shard")
    samples = 0
    with pool(args.workers) as builders:
        for stats in builders.imap_unordered(build_one, todo):
            samples += stats["samples"]
            bar.update(1)
            bar.set_postfix(samples=samples)
    bar.close()
    if args.part is None:
        return _report(write_shard_index(dest, mine, cfg), dest, args)
    part = f"parts/{part_name(args.part, args.num_parts)}"
    if not dest.exists(f"{part}/{INDEX_NAME}"):
        shutil.rmtree(dest.local / part, ignore_errors=True)
        write_shard_index(dest, mine, cfg, part)
    return _report(json.loads(dest.read_text(f"{part}/{INDEX_NAME}")), dest, args)


def _report(index: dict, dest: Destination, args) -> dict:
    if dest.is_s3 and not args.staging:
        shutil.rmtree(dest.local, ignore_errors=True)
    print(f"index: {index['total_samples']} samples ({index['total_hr']} high-res >= {index['hr_threshold']}px) in "
          f"{len(index['shards'])} shards, {index['total_bytes'] / 2**20:.1f} MB; skipped {index['build']['skipped']}; "
          f"converted {index['build']['converted']}; ignored {index['build'].get('ignored', {})}", flush=True)
    return index


def build_parser() -> argparse.ArgumentParser:
    from infd.cli.common import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m data_prep.build_shards", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--input", required=True, help="image folder, img2dataset output dir, or LAION-style parquet")
    p.add_argument("--output", required=True, help="directory or s3://bucket/prefix")
    p.add_argument("--format", choices=["folder", "img2dataset", "parquet"],
                   help="layout of --input (default: detected)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per output tar")
    p.add_argument("--workers", type=int, default=max(1, mp.cpu_count()),
                   help="processes converting images (default: the number of CPUs, here %(default)s)")
    p.add_argument("--path-column", help="parquet: column with the image path (default: path/filepath/...)")
    p.add_argument("--staging", help="s3 output: local staging directory (default: a temporary one)")
    defaults = FilterConfig()
    p.add_argument("--min-side", type=int, default=defaults.min_side, help="drop images whose short side is "
                   "smaller (px)")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="drop images with more pixels (decompression bombs)")
    p.add_argument("--max-aspect", type=float, default=defaults.max_aspect, help="drop images whose long/short "
                   "side ratio is larger")
    p.add_argument("--max-punsafe", type=float, default=defaults.max_punsafe, help="LAION metadata: drop images "
                   "whose NSFW probability is larger (kept when the column is missing)")
    p.add_argument("--max-pwatermark", type=float, default=defaults.max_pwatermark, help="LAION metadata: drop "
                   "images whose watermark probability is larger (kept when the column is missing)")
    p.add_argument("--min-aesthetic", type=float, default=defaults.min_aesthetic, help="LAION metadata: drop "
                   "images whose aesthetic score is lower (default: no aesthetic filter)")
    p.add_argument("--hr-threshold", type=int, default=defaults.hr_threshold,
                   help="long side (px, upright) from which a sample counts as high-res")
    p.add_argument("--no-verify", action="store_true", help="skip the test decode of kept images")
    add_part_args(p, "build and index")
    return p


def parse_args(argv=None):
    p = build_parser()
    return check_part_args(p, p.parse_args(argv))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not Path(args.input).exists():
        print(f"python -m data_prep.build_shards: error: --input {args.input} does not exist", file=sys.stderr)
        return 2
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_as_process(main))
