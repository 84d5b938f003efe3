"""`make demo`: what the system does so far, end to end on a photo an installed package ships.

Encodes a photograph (scikit-image's astronaut) with the CPU-sized autoencoder, decodes the
feature map once and renders it at several resolutions through tiles, printing time and peak
memory. The autoencoder is UNTRAINED (random weights) until the training stages land: the
renders show the machinery (any resolution from one small latent, bounded memory), not quality.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from infd.config import from_mapping, load_mapping
from infd.describe import describe_autoencoder
from infd.export import load_model, save_model
from infd.image import pil_to_tensor, resize_antialiased, save_image
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.render import render_tiles
from infd.utils.memory import track_peak

ROOT = Path(__file__).resolve().parents[1]


def demo_photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = p.parse_args()
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    paper = describe_autoencoder(from_mapping(AutoencoderConfig, load_mapping(ROOT / "conf/model/infd_paper.yaml")))
    print("paper autoencoder (conf/model/infd_paper.yaml):", json.dumps(paper["params"]))
    cfg = from_mapping(AutoencoderConfig, load_mapping(ROOT / "conf/model/cpu_tiny.yaml"))
    print("\nNOTE: the demo model (conf/model/cpu_tiny.yaml) is UNTRAINED: random weights, so the renders "
          "below show the rendering machinery, not image quality.\n")
    export = save_model(NeuralFieldAutoencoder(cfg), out / "untrained_export")
    model = load_model(export, device)  # round trip through safetensors + config.json

    photo = demo_photo()
    x = pil_to_tensor(resize_antialiased(photo, (256, 256)))[None].to(device)
    save_image(x, out / "input_256.png")
    with torch.no_grad():
        z = model.encode(x)
        phi = model.decode(z)
    print(f"photo {photo.width}x{photo.height} -> input 256x256 -> latent {tuple(z.shape[1:])} "
          f"-> phi {tuple(phi.shape[1:])}")
    for size in args.sizes:
        start = time.perf_counter()
        with track_peak(device) as mem:
            img = render_tiles(model.renderer, phi, (size, size))
        seconds = time.perf_counter() - start
        working_mb = (mem["peak_bytes"] - img.numel() * 4) / 2**20
        path = save_image(img, out / f"render_{size}.png")
        print(f"render {size:5d}x{size:<5d} {seconds:7.2f} s  working memory {working_mb:8.1f} MB  -> {path}")
    region = render_tiles(model.renderer, phi, (4096, 4096), region=(1024, 1024, 1536, 1536))
    print(f"region (1024,1024)-(1536,1536) of a 4096x4096 render -> {save_image(region, out / 'region_4096.png')}")
    print(f"\nOutputs in {out.resolve()} (model UNTRAINED).")


if __name__ == "__main__":
    main()
