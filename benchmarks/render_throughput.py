"""Render throughput of the paper's CLIF: megapixels/s and MFU, several tiles per renderer call against
one tile at a time, and bf16 against fp32, side by side in one process.

One 64x64 latent through the paper autoencoder (conf/model/infd_paper.yaml, random init: the weights
cannot be downloaded; the FLOPs are the paper model's, the pixel values are not) gives phi; each row
renders the whole SIZE x SIZE canvas from it (2048 on a CPU, 4096 on a GPU) with render_tiles:
  one_tile        one padded tile per renderer call (batch_pixels=1), fp32: the official code's loop;
  batched         several same-shape tiles per call (--batch-pixels query pixels), fp32;
  batched_bf16    the same under a bf16 autocast;
  batched_nhwc    the same as batched with the renderer's weights in channels_last (--channels-last).
Per row: seconds, megapixels/s, MFU (the render's FLOPs from torch's FLOP counter, per window shape,
over the device's measured peak in the row's dtype, infd/utils/mfu.py) and peak memory. Checks: the
batched fp32 image against one tile at a time (max abs diff), bf16 against fp32 as PSNR with peak 2
(images in [-1, 1]) with the fp32 image's standard deviation beside it (a random-init renderer's
output is not a photograph: the std says how much signal the PSNR is measured against).

    python benchmarks/render_throughput.py                  # about 10 minutes on 2 CPU cores
    python benchmarks/render_throughput.py --size 512       # seconds: checks the script

Last line: one JSON object (batched_max_abs_diff, bf16_psnr_db, render_mfu = the batched fp32 row's).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.config import from_mapping, load_mapping  # noqa: E402
from infd.geometry import crop_queries  # noqa: E402
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder  # noqa: E402
from infd.render import RenderOptions, padded_tile, render_tiles, tile_boxes  # noqa: E402
from infd.utils.memory import track_peak  # noqa: E402
from infd.utils.mfu import count_flops, measure_peak, mfu  # noqa: E402


def build(config: str, device: torch.device):
    torch.manual_seed(0)
    model = NeuralFieldAutoencoder(from_mapping(AutoencoderConfig, load_mapping(config))).to(device).eval()
    with torch.no_grad():
        phi = model.decode(torch.randn(1, model.cfg.bottleneck.embed_dim, 64, 64, device=device))
    return model.renderer, phi


def render_flops(renderer, phi, size: int, options: RenderOptions) -> int:
    """FLOPs of a whole render: one counted renderer call per window shape, times its windows."""
    shapes = Counter()
    for box in tile_boxes((size, size), (0, 0, size, size), options.tile):
        window = padded_tile((size, size), box, options.tile, options.pad)
        shapes[(window[2] - window[0], window[3] - window[1])] += 1
    total = 0
    for shape, n in shapes.items():  # a convolution's FLOPs depend on its window's shape alone
        coords, cells = crop_queries((size, size), (0, 0, *shape), phi.shape[0], phi.device)
        with torch.no_grad():
            total += n * count_flops(lambda: renderer(phi, coords, cells))
    return total


def row(name: str, renderer, phi, size: int, options: RenderOptions, flops: int, peak, device) -> tuple:
    with track_peak(device) as memory:
        start = time.perf_counter()
        image = render_tiles(renderer, phi, (size, size), options=options, progress=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 2), "megapixels_per_s": round(size * size / 1e6 / seconds, 4),
              "tflop": round(flops / 1e12, 3), "mfu": round(mfu(flops, seconds, peak), 4),
              "peak_mem_mib": round(memory["peak_bytes"] / 2**20, 1), "batch_pixels": options.batch_pixels,
              "precision": options.precision}
    print(name, json.dumps(result), flush=True)
    return result, image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "conf/model/infd_paper.yaml"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, help="canvas side (default: 2048 on a CPU, 4096 on a GPU)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--pad", type=int, default=8)
    p.add_argument("--batch-pixels", type=int, help="query pixels per call of the batched rows (default: "
                   "RenderOptions' on a CPU, 4x that on a GPU)")
    p.add_argument("--channels-last", action="store_true", help="add the channels_last row")
    args = p.parse_args()
    device = torch.device(args.device)
    size = args.size or (4096 if device.type == "cuda" else 2048)
    batch_pixels = args.batch_pixels or RenderOptions().batch_pixels * (4 if device.type == "cuda" else 1)
    peaks = {dtype: measure_peak(device, dtype) for dtype in (torch.float32, torch.bfloat16)}
    renderer, phi = build(args.config, device)
    options = {"one_tile": RenderOptions(args.tile, args.pad, batch_pixels=1),
               "batched": RenderOptions(args.tile, args.pad, batch_pixels=batch_pixels),
               "batched_bf16": RenderOptions(args.tile, args.pad, batch_pixels=batch_pixels, precision="bf16")}
    flops = render_flops(renderer, phi, size, options["batched"])
    rows, images = {}, {}
    for name, opts in options.items():
        peak = peaks[torch.bfloat16 if opts.precision == "bf16" else torch.float32]
        rows[name], images[name] = row(name, renderer, phi, size, opts, flops, peak, device)
    if args.channels_last:
        nhwc = renderer.to(memory_format=torch.channels_last)
        rows["batched_nhwc"], images["batched_nhwc"] = row("batched_nhwc", nhwc, phi, size, options["batched"],
                                                           flops, peaks[torch.float32], device)
    reference = images["one_tile"]
    mse = (images["batched_bf16"] - images["batched"]).pow(2).mean().item()
    result = {
        "device": str(device), "size": size, "tile": args.tile, "pad": args.pad, "weights": "random init",
        "peak_tflops": {str(k).removeprefix("torch."): round(v.flops_per_s / 1e12, 4) for k, v in peaks.items()},
        "rows": rows,
        "batched_speedup": round(rows["one_tile"]["seconds"] / rows["batched"]["seconds"], 3),
        "bf16_speedup": round(rows["batched"]["seconds"] / rows["batched_bf16"]["seconds"], 3),
        "batched_max_abs_diff": float((images["batched"] - reference).abs().max()),
        "bf16_psnr_db": round(10 * math.log10(4 / mse), 2) if mse > 0 else float("inf"),
        "fp32_std": round(float(images["batched"].std()), 4),
        "render_mfu": rows["batched"]["mfu"],
    }
    if "batched_nhwc" in images:
        result["nhwc_max_abs_diff"] = float((images["batched_nhwc"] - reference).abs().max())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
