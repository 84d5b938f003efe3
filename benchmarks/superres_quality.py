"""Super-resolution quality on the demo's data (issue 28): a tiny super-resolution UNet trained briefly here,
with and without the alignment loss (same steps, same seeds, the same batches), measured on held-out
photographs.

    make demo && python benchmarks/superres_quality.py            # the demo's shards and autoencoder
    python benchmarks/superres_quality.py --shards S --ae AE_EXPORT --images FOLDER --steps 400

1. Trains `experiment=sr_cpu_tiny` twice on the shards with the autoencoder: `diffusion.align.enabled` true (at
   --align-weight, default 1.0: a short CPU run shows more at a larger weight) and false (LPIPS random-init
   offline: the alignment loss is then L1 plus a random-feature distance). Both runs carry GT patches, so the
   loader's draws, and hence the batches, are the same.
2. Clean-latent prediction error on the held-out images: each image (its centre square at the encoder's input
   size) is the target, its 4x-downscaled version the condition; at timesteps t in --timesteps the target's
   latent is noised (noise keyed by (image, t)), the UNet's clean-latent prediction decoded and rendered at the
   encoder's input size, and its L1 to the image and its PSNR measured. Mean over t <= the bound (t_max 500)
   and over t above it, per model.
3. `infd eval-sr` for both UNets (bicubic, the autoencoder alone, the UNet, the UNet with its condition zeroed)
   at scales 2 4 8 16 on the held-out images at 256 px (random-init LPIPS and FID features: labelled so).

Last line: JSON with x0_l1_align, x0_l1_plain and their ratio (below the bound and above), the eval-sr tables
and the headline ratios: lr_rmse of the SR UNet against the autoencoder-only path and against the zeroed
condition, per scale.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.cli.sample import latent_diffusion, load_unet  # noqa: E402
from infd.diffusion.generate import unet_fn  # noqa: E402
from infd.diffusion.schedule import build_schedule  # noqa: E402
from infd.diffusion.superres import encode_images, encoder_input  # noqa: E402
from infd.eval.pfid import real_square  # noqa: E402
from infd.eval.superres import lowres_of  # noqa: E402
from infd.export import load_export  # noqa: E402
from infd.render import render_tiles  # noqa: E402

DEMO = ROOT / "demo_out"
BOUND = 500


def train(name: str, align: bool, args, root: Path) -> Path:
    cmd = [sys.executable, "-m", "train.diffusion", "experiment=sr_cpu_tiny", f"run.root={root}", f"run.name={name}",
           f"data.loader.shards={args.shards}", f"data.autoencoder={args.ae}", f"trainer.max_steps={args.steps}",
           f"trainer.ckpt_every={args.steps}", "data.loader.patch.gt=true", f"diffusion.align.enabled={align}",
           "diffusion.align.lpips=random", f"diffusion.align.weight={args.align_weight}"]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"trained {name} ({args.steps} steps) in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return root / name / "export" / "unet"


@torch.no_grad()
def x0_errors(unet_path: Path, ae, images: list[torch.Tensor], timesteps: list[int], seed: int) -> dict:
    """{t: (mean L1, mean PSNR)} of the decoded clean-latent predictions over the images."""
    from infd.metrics import psnr

    unet, record = load_unet(str(unet_path), "cpu")
    model = latent_diffusion(unet, record, "cpu")
    schedule = build_schedule(model.diffusion)
    fn, s = unet_fn(unet, schedule), model.latent_scale
    r = ae.cfg.net.resolution
    out = {}
    for t in timesteps:
        l1, db = [], []
        for i, image in enumerate(images):
            target = encoder_input(image, r)  # the image at the encoder's input size
            z = encode_images(ae, [target[0]], "cpu") * s
            cond = encode_images(ae, [lowres_of(target, 4)[0]], "cpu") * s
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed * 100003 + i * 1009 + t))
            tt = torch.full((1,), t)
            x_t = schedule.add_noise(z, noise, tt)
            z0, _ = schedule.to_x0_eps(fn(x_t, tt, {"lowres": cond, "level": torch.zeros(1)}), x_t, tt)
            rgb = render_tiles(ae.renderer, ae.decode(z0 / s), (r, r)).clamp(-1, 1)
            l1.append(float((rgb - target).abs().mean()))
            db.append(float(psnr(rgb, target)))
        out[t] = (sum(l1) / len(l1), sum(db) / len(db))
    return out


def eval_sr(unet: Path, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "infd.cli", "eval-sr", "--ae", args.ae, "--unet", str(unet), "--images",
           args.images, "--methods", "bicubic", "ae", "diffusion", "diffusion_nocond", "--scales", "2", "4", "8",
           "16", "--size", "256", "--lpips", "random", "--features", "randinit", "--feature-dim", "64", "--steps",
           str(args.sample_steps), "--quiet", "--out", str(out)]
    res = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def held_out_folder(args, tmp: Path) -> str:
    """--images, else the photographs `make demo` holds out, written as files."""
    if args.images:
        return args.images
    from train.demo import HELD_OUT, photo

    folder = tmp / "held_out"
    folder.mkdir()
    for name in HELD_OUT:
        photo(name).convert("RGB").save(folder / f"{name}.png")
    return str(folder)


def summary(errors: dict, tables: dict, timesteps: list[int]) -> dict:
    def mean(name: str, below: bool, k: int) -> float:
        values = [errors[name][t][k] for t in timesteps if (t <= BOUND) == below]
        return sum(values) / len(values)

    out = {}
    for part, below in (("below_bound", True), ("above_bound", False)):
        a, p = mean("align", below, 0), mean("plain", below, 0)
        out[f"x0_l1_align_{part}"], out[f"x0_l1_plain_{part}"], out[f"x0_l1_ratio_{part}"] = a, p, a / p
        out[f"x0_psnr_align_{part}"], out[f"x0_psnr_plain_{part}"] = mean("align", below, 1), mean("plain", below, 1)
    for name, table in tables.items():
        m = table["methods"]
        for scale in m["diffusion"]:
            out[f"{name}_lr_rmse_vs_ae_{scale}"] = m["diffusion"][scale]["lr_rmse"] / m["ae"][scale]["lr_rmse"]
            out[f"{name}_lr_rmse_vs_nocond_{scale}"] = (m["diffusion"][scale]["lr_rmse"]
                                                       / m["diffusion_nocond"][scale]["lr_rmse"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(DEMO / "shards"))
    p.add_argument("--ae", default=str(DEMO / "runs" / "demo_autoencoder" / "export" / "autoencoder"))
    p.add_argument("--images", help="folder of held-out images (default: the demo's two held-out photographs)")
    p.add_argument("--steps", type=int, default=400, help="training steps of each model")
    p.add_argument("--align-weight", type=float, default=1.0, help="diffusion.align.weight of the aligned run")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of eval-sr's sampling")
    p.add_argument("--timesteps", type=int, nargs="+", default=[50, 150, 250, 350, 450, 600, 800])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="keep the runs and eval-sr outputs in this folder (default: a temporary one)")
    args = p.parse_args()
    for path, flag in ((args.shards, "--shards"), (args.ae, "--ae")):
        if not Path(path).exists():
            sys.exit(f"{flag} {path} does not exist: run `make demo` first, or give {flag}")
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="superres_quality_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        args.images = held_out_folder(args, tmp)
        unets = {"align": train("sr_align", True, args, tmp / "runs"),
                 "plain": train("sr_plain", False, args, tmp / "runs")}
        ae, _ = load_export(args.ae, "cpu")
        from infd.data.decode import image_files
        from infd.eval.real_set import FolderSet

        folder = FolderSet(image_files(args.images))
        images = [real_square(folder.read(i), 256) for i in range(len(folder.ids))]
        images = [x for x in images if x is not None]
        errors = {name: x0_errors(path, ae, images, args.timesteps, args.seed) for name, path in unets.items()}
        tables = {name: eval_sr(path, args, tmp / f"eval_sr_{name}") for name, path in unets.items()}
        result = summary(errors, tables, args.timesteps) | {
            "x0_error_per_t": {name: {str(t): {"l1": v[0], "psnr": v[1]} for t, v in e.items()}
                               for name, e in errors.items()},
            "eval_sr": tables, "steps": args.steps, "align_weight": args.align_weight,
            "sample_steps": args.sample_steps, "held_out": len(images),
            "bound": BOUND, "device": "cpu", "note": "LPIPS and FID features random-init (offline): *_randinit"}
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
