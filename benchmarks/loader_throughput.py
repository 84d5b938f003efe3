"""Samples/s of one data worker: our decode path vs a naive one, side by side on 2K-4K JPEGs.

ours:  one JPEG decode at the smallest DCT scale that keeps DECODE_OVERSAMPLE x 256 pixels across
       the square for the encoder input and patch.gt_decode_oversample x r for the GT, then only
       the crop window is resampled, and the encoder input through the reducing gap
       (infd.data.transforms, infd.image.resize_antialiased).
naive: full-size decode, cut the square, resize it whole to r x r with the exact Lanczos, crop
       P x P, and resize it to 256 with the exact Lanczos. Same random plans (r, square, crop),
       same tensors' shapes.

    python benchmarks/loader_throughput.py [--photos ../shared/data/photos] [--images 24] [--rounds 2]
        [--oversample F] [--gt-oversample F]   # DECODE_OVERSAMPLE, patch.gt_decode_oversample

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

from infd.data import transforms  # noqa: E402
from infd.data.transforms import (DECODE_OVERSAMPLE, PatchConfig, _to_uint8_tensor,  # noqa: E402
                                  make_patch_sample, plan_patch)
from infd.image import resize_antialiased  # noqa: E402


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
    full = resize_antialiased(square, (plan.r, plan.r), reducing_gap=None)  # the exact filter
    ct, cl = plan.crop
    gt = full.crop((cl, ct, cl + cfg.patch_size, ct + cfg.patch_size))
    enc = resize_antialiased(square, (cfg.encoder_size, cfg.encoder_size), reducing_gap=None)
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
    p.add_argument("--oversample", type=float, default=DECODE_OVERSAMPLE)
    p.add_argument("--gt-oversample", type=float, default=PatchConfig.gt_decode_oversample,
                   help="patch.gt_decode_oversample")
    args = p.parse_args()
    transforms.DECODE_OVERSAMPLE = args.oversample
    import torch

    torch.set_num_threads(1)  # one worker = one core
    images = large_jpegs(Path(args.photos), args.images)
    cfg = PatchConfig(gt_decode_oversample=args.gt_oversample)
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
                      "patch_size": cfg.patch_size, "r_max": cfg.r_max, "decode_oversample": args.oversample,
                      "gt_decode_oversample": args.gt_oversample,
                      "filter": "lanczos"}))


if __name__ == "__main__":
    main()
