"""Stage-2 step throughput with the latent cache vs encoding images on the fly, side by side.

Both run the same UNet training step (AdamW, epsilon objective) for the same number of steps on
the same photographs: `cached` reads latents written by data_prep.encode_latents; `on the fly`
reads the image shards (decode, resize) and runs the autoencoder's encoder every step. One
process, one loader worker each, the autoencoder from --ae-config (random weights: only its cost
matters here).

    python benchmarks/latent_cache.py [--photos ../shared/data/photos] [--ae-config conf/model/infd_paper.yaml]

Last line: JSON with samples_per_s_cached, samples_per_s_on_the_fly and speedup.
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
from infd.data.loader import DataConfig, build_loader  # noqa: E402
from infd.data.latents import collate_latents, latent_sample  # noqa: E402
from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_loss  # noqa: E402
from infd.keyed_random import KeyedRandom  # noqa: E402
from infd.export import ExportRecord, save_export  # noqa: E402
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder  # noqa: E402
from infd.models.unet import UNet, UNetConfig  # noqa: E402


def run(loader, step_fn, steps: int) -> float:
    it = iter(loader)
    step_fn(next(it))  # warm-up
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        step_fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    p.add_argument("--ae-config", default=str(ROOT / "conf/model/infd_paper.yaml"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    ae = NeuralFieldAutoencoder(from_mapping(AutoencoderConfig, load_mapping(args.ae_config))).eval()
    res = ae.cfg.net.resolution
    unet = UNet(UNetConfig(ch=64, ch_mult=(1, 2, 2), attn_ds=(4,)))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
    schedule = build_schedule(DiffusionConfig())

    steps = [0]

    def unet_step(z):
        loss, _ = training_loss(unet, schedule, z, KeyedRandom(0, steps[0], range(z.shape[0])))
        steps[0] += 1
        opt.zero_grad()
        loss.backward()
        opt.step()

    def on_the_fly(batch):
        with torch.no_grad():
            z = ae.encode(batch.to("cpu").enc)
        unet_step(z)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        py = sys.executable
        subprocess.run([py, "-m", "data_prep.build_shards", "--input", args.photos, "--output", str(tmp / "img"),
                        "--samples-per-shard", "16", "--workers", "2"], check=True, capture_output=True)
        save_export(ae, ExportRecord("autoencoder", ae.cfg), tmp / "ae")
        subprocess.run([py, "-m", "data_prep.encode_latents", "--ae", str(tmp / "ae"), "--shards", str(tmp / "img"),
                        "--output", str(tmp / "lat")], check=True, capture_output=True)
        base = {"batch_size": args.batch_size, "num_workers": 1}
        images = build_loader(from_mapping(DataConfig, base | {"shards": str(tmp / "img"), "patch": {
            "encoder_size": res, "patch_size": 64, "r_max": 256, "small": "upsample"}}))
        latents = build_loader(from_mapping(DataConfig, base | {"shards": str(tmp / "lat")}), 0, 1,
                               latent_sample, collate_latents)
        cached = run(latents, lambda b: unet_step(b.z), args.steps)
        print(f"cached latents: {cached:.2f} samples/s", flush=True)
        fly = run(images, on_the_fly, args.steps)
        print(f"on the fly:     {fly:.2f} samples/s", flush=True)
    print(json.dumps({"samples_per_s_cached": round(cached, 2), "samples_per_s_on_the_fly": round(fly, 2),
                      "speedup": round(cached / fly, 2), "autoencoder": Path(args.ae_config).name,
                      "encoder_input": res, "batch_size": args.batch_size, "steps": args.steps}))


if __name__ == "__main__":
    main()
