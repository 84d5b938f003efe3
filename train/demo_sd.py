"""`make demo-sd`: the Stable Diffusion path end to end, on TINY RANDOM-INIT models.

No pretrained Stable Diffusion can be downloaded here, so this writes a tiny random-init SD folder
in the diffusers layout (train/tiny_sd.py: VAE, UNet2DConditionModel, CLIP text encoder, tokenizer,
DDIM scheduler config) and runs on it exactly the recipe a user runs on the real one:

1. stage 1: the SD VAE converted into a neural-field autoencoder (encoder frozen, decoder without
   its tail fine-tuned, a new CLIF renderer) on scikit-image's photographs (experiment=ae_from_sd);
2. a latent cache with the converted encoder (= SD's latents);
3. stage 2: diffusers' UNet fine-tuned under our DeepSpeed engine with the folder's CLIP text
   encoder, its schedule and latent scale 0.18215 (experiment=diffusion_from_sd);
4. `infd sample`: a prompt rendered at 1024x1024 and a region of a 4096x4096 render.

The images show that the path runs, not quality: every network starts from random weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from infd.utils.process_main import run_as_process
from train.demo import write_dataset
from train.tiny_sd import write_tiny_sd

RANDOM = "TINY RANDOM-INIT models (no pretrained weights offline): this shows the path, not image quality"


def stage1(out: Path, sd: Path, steps: int) -> Path:
    print(f"\n== 2. stage 1: convert the SD VAE, train decoder + new renderer ({steps} steps, encoder frozen)",
          flush=True)
    subprocess.run([sys.executable, "-m", "train.autoencoder", "experiment=ae_from_sd", f"model.init.autoencoder={sd}",
                    "model.renderer.hidden=32", "model.renderer.n_blocks=1",
                    "model.renderer.norm=pixel", "model.net.resolution=64", f"run.root={out / 'runs'}",
                    "run.name=demo_sd_autoencoder", f"data.loader.shards={out / 'shards'}",
                    f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps}", "trainer.log_every=10",
                    "trainer.image_every=1000", "trainer.ema_decay=0.99", "optim.lr=1e-3", "loss.lpips_weight=0",
                    "loss.lpips_backbone=random", "loss.disc_start=1000000", "data.loader.batch_size=4",
                    "data.loader.num_workers=1", "data.loader.p_hr=0.3", "data.loader.patch.patch_size=64",
                    "data.loader.patch.r_max=256", "data.loader.patch.encoder_size=64",
                    "data.loader.patch.small=upsample"], check=True)
    return out / "runs" / "demo_sd_autoencoder" / "export" / "autoencoder"


def stage2(out: Path, sd: Path, ae: Path, steps: int) -> Path:
    print(f"\n== 3. latent cache, then stage 2: the SD UNet fine-tuned for {steps} steps", flush=True)
    subprocess.run([sys.executable, "-m", "data_prep.encode_latents", "--ae", str(ae), "--shards",
                    str(out / "shards"), "--output", str(out / "latents")], check=True)
    subprocess.run([sys.executable, "-m", "train.diffusion", "experiment=diffusion_from_sd", f"unet.pretrained={sd}",
                    f"run.root={out / 'runs'}", "run.name=demo_sd_diffusion", f"data.loader.shards={out / 'latents'}",
                    f"data.autoencoder={ae}", f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps}",
                    "trainer.log_every=10", "trainer.image_every=1000", "trainer.ema_decay=0.99", "optim.lr=1e-4",
                    "data.loader.num_workers=0", "samples.latent_size=32"], check=True)
    return out / "runs" / "demo_sd_diffusion" / "export" / "unet"


def sample(out: Path, unet: Path) -> list[Path]:
    print("\n== 4. infd sample: one prompt at 1024x1024 and a region of a 4096x4096 render", flush=True)
    cmd = [sys.executable, "-m", "infd.cli", "sample", "--unet", str(unet), "--prompt",
           "a mountain lake at sunrise, 4k, high definition", "--steps", "10", "--cfg", "5", "--seed", "1"]
    full, region = out / "sd_sample_1024.png", out / "sd_sample_4096_region.png"
    subprocess.run(cmd + ["--size", "1024x1024", "--out", str(full)], check=True)
    subprocess.run(cmd + ["--size", "4096x4096", "--region", "1536,1536,2048,2048", "--out", str(region)], check=True)
    return [full, region]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_sd_out", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="stage-1 steps (default: %(default)s)")
    p.add_argument("--diffusion-steps", type=int, default=40, help="stage-2 steps (default: %(default)s)")
    args = p.parse_args()
    out, start = Path(args.out).resolve(), time.time()
    print(f"== make demo-sd: {RANDOM}", flush=True)
    print("== 1. a tiny random-init Stable Diffusion folder (diffusers layout) and the demo's photographs", flush=True)
    sd = write_tiny_sd(out / "tiny_sd", sample_size=32)  # the UNet is trained and sampled on 32x32 latents
    write_dataset(out / "photos")
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", str(out / "photos"), "--output",
                    str(out / "shards"), "--samples-per-shard", "12", "--min-side", "128", "--workers", "2"],
                   check=True)
    ae = stage1(out, sd, args.steps)
    unet = stage2(out, sd, ae, args.diffusion_steps)
    paths = sample(out, unet)
    print(f"\n{RANDOM}.\nOutputs:\n  " + "\n  ".join(map(str, paths)))
    print(json.dumps({"random_init": True, "tiny_sd": str(sd), "autoencoder": str(ae), "unet": str(unet),
                      "outputs": [str(p) for p in paths], "minutes": round((time.time() - start) / 60, 1)}))


if __name__ == "__main__":
    run_as_process(main)
