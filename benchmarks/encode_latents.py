"""Images/s of data_prep.encode_latents against the path it replaced, side by side in one process
on the same shards, autoencoder and batch size.

before: each image decoded at full resolution in the main process, one at a time (centre square,
        resize_antialiased), then the batch encoded and written, shard after shard.
after:  encode_shards as the command runs it: DataLoader workers (--workers) decode at the
        reduced JPEG scale (centre_encoder_input) and skip what the index excludes; the main process
        encodes batches and writes the tars. Also with --workers 0 (the reduced decode alone).

The shards hold the photos (--repeat times, each copy its own sample) at their size, or upscaled
to --long-side (the size of a high-res dataset's images). The autoencoder is cpu_tiny with random
weights at --resolution, 64 by default: on a CPU its encoder at 256 px costs 30x the decode and
would be all that is measured, while on a GPU node the decode is the bound; and 64 px on these
<= 1K photos picks the DCT scales a 256 px autoencoder picks on 1-4K images. The encoder runs with
one torch thread, beside the decoding workers.

    python benchmarks/encode_latents.py [--photos ../shared/data/photos] [--repeat 2] [--resolution 64]
        [--long-side 0] [--workers 2] [--batch-size 16] [--rounds 2]

Per run: images/s and the share of the time the main process spent in the encoder (near 100%: the
decode is hidden and a faster encoder, a GPU's, would go faster); then the data path's own rate
(decode, resize, write: images/s outside the encoder) of the two paths that run in one process.
Last line: JSON with images_per_s_before, images_per_s_after, speedup, the encoder shares, the
data path rates and the setup.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.build_shards import Destination, build, parse_args as build_args  # noqa: E402
from data_prep.encode_latents import encode_shards, index_ids, source_index, write_batch  # noqa: E402
from infd.data.decode import SkipSample, decode_rgb, open_image  # noqa: E402
from infd.data.tar_samples import image_bytes, iterate_tar  # noqa: E402
from infd.data.urls import expand_urls  # noqa: E402
from infd.config import from_mapping, load_mapping  # noqa: E402
from infd.eval.reconstruction import centre_square  # noqa: E402
from infd.image import resize_antialiased  # noqa: E402
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder  # noqa: E402
from infd.utils.signals import PreemptionFlag  # noqa: E402


def photo_folder(photos: Path, out: Path, repeat: int, long_side: int) -> int:
    """The photos, `repeat` times, as JPEGs in `out` (upscaled to long_side when > 0); returns the count."""
    out.mkdir(parents=True)
    sources = sorted(photos.glob("*.jpg"))
    for copy in range(repeat):
        for path in sources:
            target = out / f"{copy}_{path.name}"
            if long_side <= 0:
                target.write_bytes(path.read_bytes())
                continue
            img = Image.open(path).convert("RGB")
            k = long_side / max(img.size)
            img.resize((round(img.width * k), round(img.height * k)), Image.BICUBIC).save(target, quality=90)
    return repeat * len(sources)


@torch.no_grad()
def before(urls: list[str], out: Path, ae, size: int, batch_size: int) -> int:
    """The replaced path: full decode in this process, one image at a time. Returns images encoded."""
    total = 0
    for i, url in enumerate(urls):
        with open(url, "rb") as stream, tarfile.open(out / f"latents-{i:06d}.tar", "w") as tar:
            batch = []
            for raw in iterate_tar(stream):
                try:
                    img = centre_square(decode_rgb(open_image(image_bytes(raw))))
                except SkipSample:
                    continue
                square = np.array(resize_antialiased(img, (size, size)))
                batch.append((raw["__key__"], torch.from_numpy(square).permute(2, 0, 1), {}))  # write_batch's input
                if len(batch) == batch_size:
                    total += write_batch(tar, batch, ae, None, False, "cpu")
                    batch = []
            if batch:
                total += write_batch(tar, batch, ae, None, False, "cpu")
    return total


def after(urls: list[str], out: Path, ae, batch_size: int, workers: int) -> int:
    """encode_shards, as data_prep.encode_latents runs it. Returns images encoded."""
    index = source_index(None, urls)
    shards = list(zip(range(len(urls)), urls, index_ids(index, urls)))
    args = Namespace(batch_size=batch_size, workers=workers, flip=False)
    encode_shards(shards, index, Destination(str(out)), ae, None, args, "cpu", PreemptionFlag(), "after")
    stats = [json.loads(p.read_text()) for p in out.glob("latents-*.json")]
    return sum(s["samples"] for s in stats)


class TimedEncoder:
    """The autoencoder, counting the seconds spent in its encoder (the rest is the data path)."""

    def __init__(self, ae):
        self.ae, self.cfg, self.seconds = ae, ae.cfg, 0.0

    def encode(self, x):
        start = time.perf_counter()
        z = self.ae.encode(x)
        self.seconds += time.perf_counter() - start
        return z


def timed(fn, urls: list[str], out: Path, ae, *args) -> tuple[float, float, int]:
    """images/s, the encoder's share of the time, images."""
    encoder = TimedEncoder(ae)
    start = time.perf_counter()
    n = fn(urls, out, encoder, *args)
    wall = time.perf_counter() - start
    return n / wall, encoder.seconds / wall, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    p.add_argument("--repeat", type=int, default=2, help="copies of each photo in the shards")
    p.add_argument("--resolution", type=int, default=64, help="the autoencoder's input size")
    p.add_argument("--long-side", type=int, default=0, help="upscale the photos to this long side (0: as they are)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the encoder gets one core, the decoding workers the others
    raw = load_mapping(ROOT / "conf/model/cpu_tiny.yaml")
    raw["net"]["resolution"] = args.resolution
    ae = NeuralFieldAutoencoder(from_mapping(AutoencoderConfig, raw)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = photo_folder(Path(args.photos), tmp / "photos", args.repeat, args.long_side)
        build(build_args(["--input", str(tmp / "photos"), "--output", str(tmp / "shards"), "--workers", "2",
                          "--samples-per-shard", str(args.samples_per_shard), "--min-side", "64"]))
        urls = expand_urls(str(tmp / "shards"))
        sizes = [Image.open(p).size for p in (tmp / "photos").iterdir()]
        print(f"{n} photos ({min(min(s) for s in sizes)}-{max(min(s) for s in sizes)} px short side) in "
              f"{len(urls)} shards; autoencoder input {args.resolution} px, batch {args.batch_size}, "
              f"{args.workers} workers", flush=True)
        paths = {"before": (before, (args.resolution, args.batch_size)),
                 "after, 0 workers": (after, (args.batch_size, 0)),
                 f"after, {args.workers} workers": (after, (args.batch_size, args.workers))}
        best = dict.fromkeys(paths, (0.0, 0.0))
        for r in range(args.rounds):  # interleaved, the best of each: the paths see the same machine state
            for name, (fn, fn_args) in paths.items():
                out = tmp / f"{r}_{name}"
                out.mkdir()
                rate, share, count = timed(fn, urls, out, ae, *fn_args)
                best[name] = max(best[name], (rate, share))
                print(f"{name:18s} {rate:7.2f} images/s ({count} images), {share:4.0%} of the time in the encoder",
                      flush=True)
    (old, old_share), (no_workers, no_workers_share), (new, new_share) = best.values()
    # In one process the encoder and the data path take turns: this is the data path's own rate.
    data_path_before, data_path_after = old / (1 - old_share), no_workers / (1 - no_workers_share)
    print(f"data path (decode, resize, write) in one process: {data_path_before:.2f} images/s before, "
          f"{data_path_after:.2f} after", flush=True)
    print(json.dumps({"images_per_s_before": round(old, 2), "images_per_s_after": round(new, 2),
                      "speedup": round(new / old, 2), "images_per_s_after_0_workers": round(no_workers, 2),
                      "encoder_share_before": round(old_share, 2), "encoder_share_after": round(new_share, 2),
                      "data_path_per_s_before": round(data_path_before, 2),
                      "data_path_per_s_after_0_workers": round(data_path_after, 2),
                      "images": n, "long_side": args.long_side or "as is", "resolution": args.resolution,
                      "workers": args.workers, "batch_size": args.batch_size, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
