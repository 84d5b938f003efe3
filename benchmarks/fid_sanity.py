"""FID sanity check: does our Frechet distance rank real < blurred < noise?

The photos are split in two halves by sorted filename, alternating: A ("real") and B ("real'").
K random PxP crops are taken from each photo; four sets are compared with FID on random-init
features (infd.eval.features kind "randinit"), once per feature size in --dims:
    real'    crops of B                        FID(real, real')   should be the smallest,
    blurred  crops of B, Gaussian-blurred      FID(real, blurred) in between,
    noise    uniform noise images in [-1, 1]   FID(real, noise)   the largest.
The features are not the Inception's, so the values are not comparable with published FIDs:
only their order means something. Dim 64 is there so that N > D (a full-rank covariance).

    python benchmarks/fid_sanity.py [--photos ../shared/data/photos] [--crop 256] [--crops 8]
        [--blur-sigma 2] [--blur-kernel 9] [--dims 64 2048] [--json]

Prints the skipped photos, N per set, a table (one row per dim) and "ORDER HOLDS" or
"ORDER BROKEN" (exit code 0 either way); with --json, one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.eval.features import FeatureConfig, build_feature_extractor, metric_suffix  # noqa: E402
from infd.eval.frechet import feature_stats, frechet_distance  # noqa: E402
from infd.image import pil_to_tensor  # noqa: E402

SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_photos(folder: Path, crop: int) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """Sorted (name, RGB image) of the photos whose short side is >= crop, and the skipped names."""
    kept, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
        with Image.open(path) as img:
            img = img.convert("RGB")
        (kept if min(img.size) >= crop else skipped).append((path.name, img))
    return kept, [name for name, _ in skipped]


def random_crops(photos: list[tuple[int, Image.Image]], crop: int, k: int, seed: int) -> torch.Tensor:
    """(len(photos) * k, 3, crop, crop) in [-1, 1]. Each position comes from a generator keyed by
    (seed, photo index, k), so the crops do not depend on the split or on the other photos."""
    out = torch.empty(len(photos) * k, 3, crop, crop)  # filled in place: a list + stack holds two copies
    for n, (index, img) in enumerate(photos):
        w, h = img.size
        for j in range(k):
            rng = np.random.default_rng([seed, index, j])
            top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            out[n * k + j] = pil_to_tensor(img.crop((left, top, left + crop, top + crop)))
    return out


def build_sets(photos, args) -> dict[str, torch.Tensor]:
    """The four image sets. Indices are positions in the sorted list of kept photos: A = even, B = odd."""
    indexed = list(enumerate(img for _, img in photos))
    real = random_crops(indexed[0::2], args.crop, args.crops, args.seed)
    real2 = random_crops(indexed[1::2], args.crop, args.crops, args.seed)
    # Blur the crops of B themselves: the blurred set differs from real' in sharpness only.
    # In chunks: blurring the whole stack at once holds several padded copies (GBs).
    blurred = torch.cat([gaussian_blur(chunk, [args.blur_kernel] * 2, [args.blur_sigma] * 2)
                         for chunk in real2.split(args.batch)])
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(real2.shape, generator=gen) * 2 - 1  # same count as real', a distribution far off
    return {"real": real, "real'": real2, "blurred": blurred, "noise": noise}


def extract(extractor, images: torch.Tensor, batch: int, desc: str) -> torch.Tensor:
    """(N, 3, H, W) -> (N, D) features, in batches (the net has no batch norm: batching is free)."""
    chunks = [extractor(images[i:i + batch]) for i in tqdm(range(0, len(images), batch), desc=desc, leave=False)]
    return torch.cat(chunks)


def fids_for_dim(sets: dict[str, torch.Tensor], dim: int, args) -> dict[str, float]:
    """FID of real against each other set, with the random-init net of feature size `dim`."""
    cfg = FeatureConfig(kind="randinit", dim=dim, seed=0)
    extractor = build_feature_extractor(cfg)
    stats = {name: feature_stats(extract(extractor, images, args.batch, f"d{dim} {name}"))
             for name, images in sets.items()}
    suffix = metric_suffix(cfg)
    return {f"fid{suffix}(real,{name})": frechet_distance(*stats["real"], *stats[name])
            for name in ("real'", "blurred", "noise")}


def print_table(rows: dict[int, dict[str, float]], orders: dict[int, bool]) -> None:
    names = list(next(iter(rows.values())))
    print(f"{'dim':>5s}  " + "  ".join(f"{n:>28s}" for n in names) + "  real'<blurred<noise")
    for dim, fids in rows.items():
        print(f"{dim:5d}  " + "  ".join(f"{fids[n]:28.4f}" for n in names) + f"  {'yes' if orders[dim] else 'NO'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=ROOT / "../shared/data/photos")
    p.add_argument("--crop", type=int, default=256, help="crop size P (photos with a shorter side are skipped)")
    p.add_argument("--crops", type=int, default=8, help="random crops K per photo")
    p.add_argument("--blur-sigma", type=float, default=2.0)
    p.add_argument("--blur-kernel", type=int, default=9, help="odd Gaussian kernel size")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 2048], help="random-init feature sizes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    args = p.parse_args()
    start = time.time()
    photos, skipped = load_photos(args.photos.resolve(), args.crop)
    print(f"{len(photos)} photos used, {len(skipped)} skipped (short side < {args.crop}): {', '.join(skipped) or '-'}")
    sets = build_sets(photos, args)
    counts = {name: len(images) for name, images in sets.items()}
    print("N per set: " + ", ".join(f"{name} {n}" for name, n in counts.items()), flush=True)
    rows = {dim: fids_for_dim(sets, dim, args) for dim in args.dims}
    # The order must hold strictly: real' < blurred < noise.
    orders = {dim: all(a < b for a, b in zip(list(f.values()), list(f.values())[1:])) for dim, f in rows.items()}
    print_table(rows, orders)
    print("note: random-init features (metrics labelled _randinit), not Inception FIDs; only the ordering is "
          "meaningful.")
    holds = all(orders.values())
    print("ORDER HOLDS" if holds else "ORDER BROKEN")
    print(f"wall time {time.time() - start:.1f} s", flush=True)
    if args.json:
        print(json.dumps({"photos_used": len(photos), "skipped": skipped, "n": counts, "crop": args.crop,
                          "crops_per_photo": args.crops, "blur_sigma": args.blur_sigma,
                          "blur_kernel": args.blur_kernel, "order_holds": holds,
                          "dims": {str(d): {**rows[d], "order_holds": orders[d]} for d in args.dims}}))


if __name__ == "__main__":
    main()
