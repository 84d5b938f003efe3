"""`infd view` from a client's side: the time to the first tile and tiles per second, for the demo's
autoencoder and for the paper's CLIF (conf/model/infd_paper.yaml, random-init: a render's cost does not depend
on the weights' values), against rendering the same screen as one `render_tiles` call in this process.

    make demo && python benchmarks/viewer_tiles.py       # the demo's autoencoder; the paper CLIF built here

For each model a real `infd view` process serves a latent on a 16384 x 16384 canvas (tiles of 256, fp32,
--max-renders 2). The client asks for the level-0 tile first (time to first tile: phi is decoded then, once
per latent), then for the finest level's tiles of a 1024 x 768 screen at the canvas's centre (4 x 3 tiles
plus the partial ones) from 4 threads: tiles per second rendered, then again from the server's cache. The
baseline: the same screen's box rendered in this process by one render_tiles call (what `infd upsample
--region` does), and the whole canvas's render time extrapolated from the per-tile time (what a fixed-size
file of the finest level would cost).

Last line: JSON {model: {first_tile_s, tiles_per_s, cached_tiles_per_s, screen_tiles, screen_s,
screen_one_call_s, full_canvas_estimate_s, ...}}.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.viewer.tiles import Pyramid  # noqa: E402

DEMO_AE = ROOT / "demo_out" / "runs" / "demo_autoencoder" / "export" / "autoencoder"
CANVAS = (16384, 16384)
SCREEN = (768, 1024)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as res:
        return res.read()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def paper_export(folder: Path) -> Path:
    """A random-init export of the paper autoencoder (its CLIF renderer)."""
    from infd.config import from_mapping, load_mapping
    from infd.export import ExportRecord, save_export
    from infd.models import AutoencoderConfig, NeuralFieldAutoencoder

    cfg = from_mapping(AutoencoderConfig, load_mapping(ROOT / "conf/model/infd_paper.yaml"))
    torch.manual_seed(0)
    return save_export(NeuralFieldAutoencoder(cfg).eval(), ExportRecord("autoencoder", cfg), folder / "paper_ae")


def screen_tiles(pyramid: Pyramid) -> tuple[list[tuple[int, int]], tuple[int, int, int, int]]:
    """The finest level's tiles of a SCREEN-sized view at the canvas centre, and its box."""
    h, w = pyramid.canvas
    top, left = (h - SCREEN[0]) // 2, (w - SCREEN[1]) // 2
    t = pyramid.tile
    tiles = [(x, y) for y in range(top // t, math.ceil((top + SCREEN[0]) / t))
             for x in range(left // t, math.ceil((left + SCREEN[1]) / t))]
    return tiles, (top, left, top + SCREEN[0], left + SCREEN[1])


def measure(name: str, ae_path: Path, tmp: Path) -> dict:
    from infd.export import load_export
    from infd.render import render_tiles

    ae, _ = load_export(ae_path, "cpu")
    side = ae.cfg.net.resolution // ae.cfg.net.downsample_factor
    torch.manual_seed(0)
    z = torch.randn(1, ae.cfg.bottleneck.embed_dim, side, side)
    torch.save(z, tmp / f"{name}_z.pt")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "infd.cli", "view", "--ae", str(ae_path), "--latents",
                               str(tmp / f"{name}_z.pt"), "--port", str(port), "--canvas",
                               f"{CANVAS[1]}x{CANVAS[0]}"], stdout=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                fetch(url + "api/info")
                break
            except OSError:
                time.sleep(0.2)
        pyramid = Pyramid(CANVAS)
        start = time.perf_counter()
        fetch(url + "tiles/0/0/0_0.png")
        first = time.perf_counter() - start
        tiles, box = screen_tiles(pyramid)
        finest = pyramid.max_level
        urls = [url + f"tiles/0/{finest}/{x}_{y}.png" for x, y in tiles]
        rates = []
        for _ in range(2):  # rendered, then from the server's cache
            start = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(fetch, urls))
            rates.append(time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(timeout=60)
    with torch.no_grad():
        start = time.perf_counter()
        render_tiles(ae.renderer, ae.decode(z), CANVAS, region=box)
        one_call = time.perf_counter() - start
    per_tile = rates[0] / len(tiles)
    return {"first_tile_s": first, "screen_tiles": len(tiles), "screen_s": rates[0],
            "tiles_per_s": len(tiles) / rates[0], "cached_tiles_per_s": len(tiles) / rates[1],
            "screen_one_call_s": one_call,
            "full_canvas_tiles": math.prod(pyramid.grid(finest)),
            "full_canvas_estimate_s": per_tile * math.prod(pyramid.grid(finest)),
            "renderer": type(ae.renderer).__name__, "hidden": getattr(ae.cfg.renderer, "hidden", None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-ae", default=str(DEMO_AE), help="the demo's autoencoder export (skipped if missing)")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper CLIF")
    args = p.parse_args()
    out = {"canvas": list(CANVAS), "screen": list(SCREEN), "device": "cpu", "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="viewer_tiles_") as tmp:
        if Path(args.demo_ae).is_dir():
            out["demo"] = measure("demo", Path(args.demo_ae), Path(tmp))
        else:
            print(f"no demo autoencoder at {args.demo_ae}: run make demo (skipped)", file=sys.stderr)
        if not args.no_paper:
            out["paper_clif_randinit"] = measure("paper", paper_export(Path(tmp)), Path(tmp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
