"""Peak working memory and time of tiled vs whole rendering from one 64x64 latent.

Each (size, mode) runs in a fresh child process. Peak working memory = peak resident memory
(CPU: VmHWM after a reset through /proc/self/clear_refs; GPU: max_memory_allocated) minus
what was resident before rendering minus the output image buffer, measured the same way for
tiled and whole. Whole renders run only where their estimated need fits in free memory.

    python benchmarks/render_memory.py [--config conf/model/infd_paper.yaml] [--sizes 1024 2048 4096]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.config import from_mapping, load_mapping  # noqa: E402
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder  # noqa: E402
from infd.render import RenderOptions, render_tiles, render_whole  # noqa: E402
from infd.utils.memory import track_peak  # noqa: E402


def build(args, device):
    raw = load_mapping(args.config)
    raw.setdefault("renderer", {})["norm"] = args.norm
    torch.manual_seed(0)
    model = NeuralFieldAutoencoder(from_mapping(AutoencoderConfig, raw)).to(device).eval()
    with torch.no_grad():
        phi = model.decode(torch.randn(1, model.cfg.bottleneck.embed_dim, 64, 64, device=device))
    return model, phi


def child(args) -> None:
    """Render one (size, mode), print {"peak_mb", "seconds"} and save the image."""
    device = torch.device(args.device)
    model, phi = build(args, device)
    size = (args.size, args.size)
    out_bytes = 3 * args.size * args.size * 4
    start = time.perf_counter()
    with track_peak(device) as mem, torch.no_grad():
        if args.mode == "tiled":
            img = render_tiles(model.renderer, phi, size, options=RenderOptions(tile=args.tile, pad=args.pad))
        else:
            img = render_whole(model.renderer, phi, size)
    seconds = time.perf_counter() - start
    peak = mem["peak_bytes"] - out_bytes
    torch.save(img.cpu(), args.save)
    print(json.dumps({"peak_mb": round(peak / 2**20, 1), "seconds": round(seconds, 2)}))


def whole_fits(args, size: int) -> bool:
    """Whole render needs about 5 activations of hidden x H x W floats at once."""
    import psutil

    raw = load_mapping(args.config)
    hidden = raw.get("renderer", {}).get("hidden", 256)
    need = 5 * hidden * size * size * 4
    if args.device.startswith("cuda"):
        return need < 0.8 * torch.cuda.mem_get_info()[0]
    return need < 0.6 * psutil.virtual_memory().available


def run_child(args, size: int, mode: str, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--mode", mode, "--save", str(save),
           "--config", args.config, "--norm", args.norm, "--tile", str(args.tile), "--pad", str(args.pad),
           "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child {size} {mode} failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"size {size:5d} {mode:5s}: peak {result['peak_mb']:9.1f} MB  {result['seconds']:8.2f} s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "conf/model/infd_paper.yaml"))
    p.add_argument("--norm", default="pixel", choices=["pixel", "group"],
                   help="CLIF normalisation; pixel makes tiled == whole exactly")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--pad", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    result = {"config": Path(args.config).name, "norm": args.norm, "device": args.device, "tile": args.tile,
              "pad": args.pad, "peak_mb_tiled": {}, "peak_mb_whole": {}, "seconds_tiled": {},
              "seconds_whole": {}, "max_abs_diff_tiled_vs_whole": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            tiled = run_child(args, size, "tiled", Path(tmp) / "tiled.pt")
            result["peak_mb_tiled"][size] = tiled["peak_mb"]
            result["seconds_tiled"][size] = tiled["seconds"]
            if not whole_fits(args, size):
                print(f"size {size:5d} whole: skipped, does not fit in free memory", flush=True)
                continue
            whole = run_child(args, size, "whole", Path(tmp) / "whole.pt")
            result["peak_mb_whole"][size] = whole["peak_mb"]
            result["seconds_whole"][size] = whole["seconds"]
            diff = (torch.load(Path(tmp) / "tiled.pt") - torch.load(Path(tmp) / "whole.pt")).abs().max()
            result["max_abs_diff_tiled_vs_whole"][size] = float(diff)
    sizes = sorted(result["peak_mb_tiled"])
    if len(sizes) > 1:
        result["tiled_peak_ratio_largest_vs_smallest"] = round(
            result["peak_mb_tiled"][sizes[-1]] / max(result["peak_mb_tiled"][sizes[0]], 1e-9), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
