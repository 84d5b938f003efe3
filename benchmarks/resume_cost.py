"""What resuming mid-epoch costs the loader: bytes read and time to the first batch, at 10%, 50%
and 90% of an epoch, against the loader this replaced (which replayed each worker's stream from
the start of its range), side by side in this process.

Fixed settings (issue 13): 2 ranks x 2 DataLoader workers, 240 shards (real JPEGs made here,
1 in 10 high-res), p_hr 0.5, shuffle block 256 samples (the old loader: shuffle_buffer 256),
batch 8 per rank. Each rank's loader is created at the position and timed to its first batch;
the bytes are what its worker processes read from files by then (/proc rchar: shards and index),
the larger worker's figure reported. Target: 90% figures at most 1.5x the 10% ones, and bytes
per worker below one shard plus 4 x 256 samples.

    python benchmarks/resume_cost.py [--baseline-rev b59db5a]

The baseline is the old loader's source at --baseline-rev, loaded from git (skipped when the
checkout has no history). Last line: JSON with the dataset size and, per position, mb_read and
resume_s for both.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.config import from_mapping  # noqa: E402
from infd.data.loader import DataConfig, build_loader  # noqa: E402
from infd.data.synthetic import synthetic_image  # noqa: E402

SHARDS, PER_SHARD, RANKS, WORKERS, BLOCK, BATCH = 240, 16, 2, 2, 256, 8
PATCH = {"patch_size": 32, "r_max": 64, "encoder_size": 32}


def make_shards(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for i in range(SHARDS * PER_SHARD):
        size = 600 if i % 10 == 0 else 160
        img = Image.open(io.BytesIO(synthetic_image(0, i % 97, size))).convert("RGB")
        img.save(src / f"{i:06d}.jpg", quality=90)
    out = tmp / "shards"
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", str(src), "--output", str(out),
                    "--samples-per-shard", str(PER_SHARD), "--workers", "2", "--hr-threshold", "512",
                    "--min-side", "64"],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def worker_bytes() -> list[int]:
    return [c.io_counters().read_chars for c in psutil.Process().children() if c.is_running()]


def first_batch(make_iter) -> tuple[float, float]:
    """(seconds to the first batch, MB the larger worker had read by then)."""
    start = time.perf_counter()
    batches = make_iter()
    next(batches)
    seconds = time.perf_counter() - start
    mb = max(worker_bytes(), default=0) / 2**20
    batches.close() if hasattr(batches, "close") else None
    del batches
    return seconds, mb


def new_loader(shards: Path, rank: int, frac: float) -> tuple[float, float]:
    cfg = from_mapping(DataConfig, {"shards": str(shards), "batch_size": BATCH, "num_workers": WORKERS,
                                    "p_hr": 0.5, "shuffle_block": BLOCK, "patch": PATCH})
    loader = build_loader(cfg, rank, RANKS)
    global_batches = loader.batches_per_epoch
    k = int(frac * global_batches)
    loader.load_state_dict({"epoch": 0, "slot": k * BATCH * RANKS, "batches": k})
    return first_batch(lambda: iter(loader))


def old_module(rev: str):
    """The replaced loader (infd/data/dataset.py at `rev`), or None without git history."""
    try:
        code = subprocess.run(["git", "show", f"{rev}:infd/data/dataset.py"], capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    path = Path(tempfile.mkdtemp()) / "old_dataset.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("old_dataset", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_dataset"] = module
    spec.loader.exec_module(module)
    return module


def old_loader(module, shards: Path, rank: int, frac: float) -> tuple[float, float]:
    cfg = from_mapping(module.DataConfig, {"shards": str(shards), "batch_size": BATCH, "num_workers": WORKERS,
                                           "p_hr": 0.5, "shuffle_buffer": BLOCK, "patch": PATCH})
    loader = module.build_loader(cfg, rank, RANKS)
    k = int(frac * loader.dataset.batches_per_epoch)
    loader.dataset.load_state_dict({"epoch": 0, "batches": k})
    return first_batch(lambda: iter(loader))


def measure(run) -> dict:
    out = {}
    for frac in (0.1, 0.5, 0.9):
        per_rank = [run(rank, frac) for rank in range(RANKS)]
        out[f"{int(frac * 100)}%"] = {"resume_s": round(max(s for s, _ in per_rank), 3),
                                     "mb_read": round(max(mb for _, mb in per_rank), 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", default="b59db5a", help="git revision of the replaced loader")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        shards = make_shards(Path(tmp))
        tars = sorted(shards.glob("*.tar"))
        shard_mb = statistics.mean(t.stat().st_size for t in tars) / 2**20
        sample_mb = sum(t.stat().st_size for t in tars) / 2**20 / (SHARDS * PER_SHARD)
        print(f"{len(tars)} shards x {PER_SHARD} samples, {shard_mb:.2f} MB per shard, made in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        new = measure(lambda rank, frac: new_loader(shards, rank, frac))
        module = old_module(args.baseline_rev)
        old = measure(lambda rank, frac: old_loader(module, shards, rank, frac)) if module else None
    bound = shard_mb + 4 * BLOCK * sample_mb
    for name, res in (("this loader", new), (f"replay loader ({args.baseline_rev})", old)):
        if res is None:
            print(f"{name}: skipped (no git history)")
            continue
        cells = ", ".join(f"{pos}: {r['mb_read']:.2f} MB {r['resume_s']:.2f} s" for pos, r in res.items())
        print(f"{name:<28} {cells}; 90%/10%: {res['90%']['mb_read'] / max(res['10%']['mb_read'], 1e-9):.2f}x MB, "
              f"{res['90%']['resume_s'] / res['10%']['resume_s']:.2f}x s")
    ok = (new["90%"]["mb_read"] <= 1.5 * new["10%"]["mb_read"]
          and new["90%"]["resume_s"] <= 1.5 * new["10%"]["resume_s"]
          and all(r["mb_read"] < bound for r in new.values()))
    print(f"bound per worker: one shard + 4 x {BLOCK} samples = {bound:.2f} MB; target met: {ok}")
    print(json.dumps({"shards": SHARDS, "samples": SHARDS * PER_SHARD, "dataset_mb": round(shard_mb * SHARDS, 1),
                      "ranks": RANKS, "workers": WORKERS, "shuffle_block": BLOCK,
                      "bound_mb_per_worker": round(bound, 2),
                      "target_met": ok, "resume": new, "replay_baseline": old}))


if __name__ == "__main__":
    main()
