"""Samples/s of one data worker: our decode path vs a naive one, side by side on 2K-4K JPEGs.

ours:  JPEG decoded at the smallest DCT scale that still covers the random size r (and the
       encoder's 256), then only the crop window is resampled (infd.data.transforms).
naive: full-size decode, resize the whole square to r x r, crop P x P, resize the square to 256.
Both use the same random plans (r, square, crop) and produce the same tensors' shapes.

    python benchmarks/loader_throughput.py [--photos ../shared/data/photos] [--images 24] [--rounds 2]

Without --photos (or if the folder is missing) the images are synthetic. Last line: JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.data.transforms import PatchConfig, _to_uint8_tensor, make_patch_sample, plan_patch  # noqa: E402


def large_jpegs(photos: Path | None, count: int, seed: int = 0) -> list[bytes]:
    """JPEGs with the long side uniform in [2048, 4096], upscaled from real photos when given."""
    rng = np.random.default_rng(seed)
    sources = sorted(photos.glob("*.jpg"))[:count] if photos and photos.is_dir() else []
    out = []
    for i in range(count):
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("RGB")
        else:
            small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        long_side = int(rng.integers(2048, 4097))
        k = long_side / max(img.size)
        img = img.resize((round(img.width * k), round(img.height * k)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def naive_sample(data: bytes, cfg: PatchConfig, rng: np.random.Generator) -> dict:
    img = Image.open(io.BytesIO(data)).convert("RGB")  # full-size decode
    plan = plan_patch(img.width, img.height, cfg, rng)
    top, left, side = plan.square
    square = img.crop((left, top, left + side, top + side))
    full = square.resize((plan.r, plan.r), Image.BICUBIC)
    ct, cl = plan.crop
    gt = full.crop((cl, ct, cl + cfg.patch_size, ct + cfg.patch_size))
    enc = square.resize((cfg.encoder_size, cfg.encoder_size), Image.BICUBIC)
    return {"gt": _to_uint8_tensor(gt), "enc": _to_uint8_tensor(enc), "r": plan.r}


def throughput(fn, images: list[bytes], cfg: PatchConfig, rounds: int) -> float:
    start, n = time.perf_counter(), 0
    for r in range(rounds):
        for i, data in enumerate(images):
            fn(data, cfg, np.random.default_rng([r, i]))
            n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # one worker = one core
    images = large_jpegs(Path(args.photos), args.images)
    cfg = PatchConfig()
    sizes = [Image.open(io.BytesIO(d)).size for d in images]
    print(f"{len(images)} JPEGs, long side {min(max(s) for s in sizes)}-{max(max(s) for s in sizes)} px, "
          f"patch {cfg.patch_size}, r_max {cfg.r_max}", flush=True)
    ours_runs, naive_runs = [], []
    for _ in range(2):  # interleaved so both see the same machine state
        ours_runs.append(throughput(make_patch_sample, images, cfg, args.rounds))
        naive_runs.append(throughput(naive_sample, images, cfg, args.rounds))
        print(f"ours {ours_runs[-1]:7.2f} samples/s   naive {naive_runs[-1]:7.2f} samples/s", flush=True)
    ours, naive = max(ours_runs), max(naive_runs)
    print(json.dumps({"samples_per_s": round(ours, 2), "samples_per_s_naive": round(naive, 2),
                      "speedup": round(ours / naive, 2), "images": len(images),
                      "source": "photos upscaled" if Path(args.photos).is_dir() else "synthetic",
                      "patch_size": cfg.patch_size, "r_max": cfg.r_max}))


if __name__ == "__main__":
    main()
