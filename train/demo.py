"""`make demo`: the system end to end on photographs that scikit-image ships.

1. a small mixed-resolution dataset: scikit-image's photographs (grayscale, RGBA and colour, 300 to
   1411 pixels) plus rescaled copies (some above 1024: the high-res stream), as WebDataset shards;
   two photographs are held out;
2. stage 1: the tiny autoencoder trains for a few minutes (experiment=ae_demo);
3. PSNR at 1x on the held-out photographs, before (the initial weights) and after training;
4. a held-out photograph upsampled 8x through tiles, and a region of a 4096 x 4096 render;
5. stage 2: a latent cache, a few minutes of the tiny text-conditioned diffusion model, and one
   sampled image rendered at 1024 x 1024 (and a region of a 4096 x 4096 render of it);
6. super-resolution: a tiny UNet conditioned on low-resolution views (with the alignment loss) trains
   briefly; a held-out photograph at 128 x 128 is upsampled 4x and 8x by it, and `infd eval-sr` measures
   it against bicubic and the autoencoder alone on both held-out photographs at 2x-16x;
7. `infd view` on the sampled latent: a headless Chromium takes two screenshots of the deep-zoom page
   (the whole canvas, and zoomed 4x into a region);
8. `infd eval-gen` on the demo UNet: FID-256, pFID 256/512/1K and CLIP score of a few samples
   against the dataset's images of 1024 px and more, with random-init feature and CLIP networks
   (offline: every name ends in _randinit; the numbers check the pipeline, they are not FIDs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from infd.config import from_mapping, load_mapping
from infd.eval.reconstruction import centre_square, evaluate_autoencoder
from infd.export import load_export
from infd.image import pil_to_tensor, resize_antialiased, save_image
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.render import render_tiles
from infd.utils.process_main import run_as_process

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PHOTOS = ["astronaut", "camera", "coffee", "coins", "hubble_deep_field", "immunohistochemistry", "moon",
                "retina", "colorwheel", "logo", "brick", "grass", "gravel", "clock", "cell", "page", "text"]
HELD_OUT = ["chelsea", "rocket"]


def photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    return Image.fromarray(arr)


def write_dataset(folder: Path) -> None:
    """Photographs at their own size plus a 0.6x and a 2.2x copy, as files with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        img = photo(name)
        for tag, scale in (("", 1.0), ("_small", 0.6), ("_large", 2.2)):
            size = (round(img.width * scale), round(img.height * scale))
            out = img if scale == 1.0 else img.resize(size, Image.BICUBIC)
            path = folder / f"{name}{tag}.png"
            out.save(path)
            path.with_suffix(".txt").write_text(f"{name.replace('_', ' ')} ({size[0]}x{size[1]})")


def held_out_squares(size: int) -> list:
    return [(name, centre_square(photo(name).convert("RGB"))) for name in HELD_OUT]


def psnr_1x(model, device) -> float:
    result = evaluate_autoencoder(model, held_out_squares(model.cfg.net.resolution), device, scales=(1,),
                                  base=model.cfg.net.resolution, progress=False)
    return result["psnr_1x"]


def initial_model(overrides: dict, device) -> NeuralFieldAutoencoder:
    """The weights the trainer starts from (same config, same seed)."""
    raw = load_mapping(ROOT / "conf/model/cpu_tiny.yaml")
    raw.setdefault("net", {})["resolution"] = overrides["resolution"]
    raw.setdefault("bottleneck", {})["kind"] = overrides["bottleneck"]
    torch.manual_seed(0)
    return NeuralFieldAutoencoder(from_mapping(AutoencoderConfig, raw)).to(device).eval()


def stage2(out: Path, ae_export: Path, steps: int) -> list[Path]:
    print("\n== 5. stage 2: latent cache -> text-conditioned diffusion -> sample at 1024x1024", flush=True)
    py = sys.executable
    subprocess.run([py, "-m", "data_prep.encode_latents", "--ae", str(ae_export), "--shards", str(out / "shards"),
                    "--output", str(out / "latents"), "--flip"], check=True)
    subprocess.run([py, "-m", "train.diffusion", "experiment=diffusion_demo", f"run.root={out / 'runs'}",
                    f"data.loader.shards={out / 'latents'}", f"data.autoencoder={ae_export}",
                    f"trainer.max_steps={steps}"], check=True)
    unet = out / "runs" / "demo_diffusion" / "export" / "unet"
    sample = [py, "-m", "infd.cli", "sample", "--ae", str(ae_export), "--unet", str(unet), "--prompt",
              "astronaut (512x512)", "--steps", "20", "--sampler", "ddim", "--seed", "1"]
    full, region = out / "sample_1024.png", out / "sample_4096_region.png"
    subprocess.run(sample + ["--size", "1024x1024", "--out", str(full)], check=True)
    subprocess.run(sample + ["--size", "4096x4096", "--region", "1536,1536,2048,2048", "--out", str(region)],
                   check=True)
    print("   (the text tower is random-init offline, so the prompt conditions on arbitrary features; "
          "the samples show the pipeline, not quality)", flush=True)
    return [full, region]


def superres(out: Path, ae_export: Path, steps: int) -> list[Path]:
    print("\n== 6. super-resolution: a UNet conditioned on low-resolution views, with the alignment loss", flush=True)
    py = sys.executable
    subprocess.run([py, "-m", "train.diffusion", "experiment=sr_cpu_tiny", f"run.root={out / 'runs'}",
                    "run.name=demo_superres", f"data.loader.shards={out / 'shards'}", f"data.autoencoder={ae_export}",
                    f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps}", "data.loader.patch.gt=true",
                    "diffusion.align.enabled=true", "diffusion.align.lpips=random"], check=True)
    unet = out / "runs" / "demo_superres" / "export" / "unet"
    held = out / "held_out"
    held.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT:
        photo(name).convert("RGB").save(held / f"{name}.png")
    name = HELD_OUT[0]
    small = out / f"{name}_input_128.png"  # step 4's input: its 8x render there is the autoencoder alone
    paths = []
    for scale in (4, 8):
        target = out / f"{name}_superres_{scale}x_{128 * scale}.png"
        subprocess.run([py, "-m", "infd.cli", "upsample", str(small), "--ckpt", str(ae_export), "--unet", str(unet),
                        "--scale", str(scale), "--steps", "20", "--out", str(target)], check=True)
        paths.append(target)
    print("   infd eval-sr: the held-out photographs' 256 px centre squares downscaled 2-16x and upsampled back "
          "(random-init LPIPS and FID features offline: *_randinit)", flush=True)
    cmd = [py, "-m", "infd.cli", "eval-sr", "--ae", str(ae_export), "--unet", str(unet), "--images", str(held),
           "--methods", "bicubic", "ae", "diffusion", "diffusion_nocond", "--scales", "2", "4", "8", "16", "--steps",
           "20", "--lpips", "random", "--features", "randinit", "--feature-dim", "64", "--out", str(out / "eval_sr")]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    table = json.loads(res.stdout.strip().splitlines()[-1])["methods"]
    print("   scale   lr_rmse: bicubic    ae  diffusion  (condition zeroed)   psnr: bicubic    ae  diffusion")
    for scale in table["bicubic"]:
        lr, db = ({m: table[m][scale][key] for m in table} for key in ("lr_rmse", "psnr"))
        print(f"   {scale:>5}            {lr['bicubic']:.3f}  {lr['ae']:.3f}  {lr['diffusion']:9.3f}  "
              f"{lr['diffusion_nocond']:18.3f}         {db['bicubic']:6.2f} {db['ae']:5.2f} {db['diffusion']:10.2f}")
    return paths + [out / "eval_sr" / "examples_x8.png"]


def viewer(out: Path, ae_export: Path) -> list[Path]:
    """Screenshots of `infd view` on the stage-2 sample, at two zoom levels (skipped, saying why, without a
    browser)."""
    import socket
    import urllib.request

    from infd.viewer import browser

    print("\n== 7. infd view: the deep-zoom page on the sampled latent, tiles rendered on request", flush=True)
    reason = browser.missing()
    if reason:
        print(f"   skipped: {reason}", flush=True)
        return []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unet = out / "runs" / "demo_diffusion" / "export" / "unet"
    cmd = [sys.executable, "-m", "infd.cli", "view", "--unet", str(unet), "--ae", str(ae_export), "--prompt",
           "astronaut (512x512)", "--seed", "1", "--steps", "20", "--port", str(port)]
    server, url = subprocess.Popen(cmd, stdout=subprocess.DEVNULL), f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/info", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"infd view exited ({server.returncode}): {' '.join(cmd)}") from None
                time.sleep(0.2)
        shots = [out / "viewer_whole.png", out / "viewer_zoom4.png"]
        with browser.open_page(url, 1024, 768) as page:
            page.screenshot(path=str(shots[0]))
            vp = browser.zoom(page, 560, 400, 4.0)
            page.screenshot(path=str(shots[1]))
        print(f"   {shots[1].name}: canvas pixels ({vp['x0']:.0f}, {vp['y0']:.0f})-({vp['x1']:.0f}, {vp['y1']:.0f}) "
              f"of 16384 x 16384, level {vp['level']}; open it yourself: infd view --unet {unet} --prompt ...",
              flush=True)
        return shots
    finally:
        server.terminate()
        server.wait(timeout=30)


def eval_gen(out: Path, ae_export: Path, n: int) -> None:
    """The last step: its JSON object is the demo's last line."""
    print(f"\n== 8. infd eval-gen: {n} samples at 1024 against the dataset's >= 1024 px images", flush=True)
    print("   offline, the feature and CLIP networks are random-init: the metrics are named *_randinit and only\n"
          "   show that the pipeline runs (they are not comparable with published FIDs; with the Inception weights\n"
          "   and --features inception the same command gives fid_256, pfid_256_1k, ...); sample i is prompted\n"
          "   with the caption of real image i (--captions)", flush=True)
    subprocess.run([sys.executable, "-m", "infd.cli", "eval-gen", "--unet", str(out / "runs" / "demo_diffusion" /
                    "export" / "unet"), "--ae", str(ae_export), "--data", str(out / "shards"), "--num-samples", str(n),
                    "--captions", "--steps", "20", "--features", "randinit", "--clip-pretrained", "none",
                    "--stats-cache", str(out / "fid_stats"), "--out", str(out / "eval_gen")], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--diffusion-steps", type=int, default=200)
    p.add_argument("--superres-steps", type=int, default=150)
    p.add_argument("--eval-samples", type=int, default=8, help="samples infd eval-gen draws at the end")
    args = p.parse_args()
    out = Path(args.out).resolve()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()

    print("== 1. dataset: scikit-image photographs -> mixed-resolution shards", flush=True)
    write_dataset(out / "photos")
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", "--input", str(out / "photos"), "--output",
                    str(out / "shards"), "--samples-per-shard", "12", "--min-side", "128", "--workers", "2"],
                   check=True)
    cli = [sys.executable, "-m", "infd.cli", "data"]
    subprocess.run([*cli, "stats", str(out / "shards"), "--png", str(out / "data_histogram.png")], check=True)
    subprocess.run([*cli, "preview", str(out / "shards"), "--out", str(out / "data_preview.png"),
                    "--patch-size", "128"],
                   check=True)

    print("\n== 2. stage 1: training the tiny autoencoder", flush=True)
    before = psnr_1x(initial_model({"resolution": 128, "bottleneck": "kl"}, device), device)
    subprocess.run([sys.executable, "-m", "train.autoencoder", "experiment=ae_demo", f"run.root={out / 'runs'}",
                    f"data.loader.shards={out / 'shards'}", f"trainer.max_steps={args.steps}"], check=True)
    export = out / "runs" / "demo_autoencoder" / "export" / "autoencoder"
    model, _ = load_export(export, device)
    after = psnr_1x(model, device)

    print("\n== 3. held-out photographs (never trained on), PSNR at 1x (128x128):", flush=True)
    print(f"   before training {before:6.2f} dB   after {args.steps} steps {after:6.2f} dB   "
          f"rise {after - before:+.2f} dB", flush=True)

    print("\n== 4. any resolution from one latent", flush=True)
    name, square = held_out_squares(128)[0]
    x = pil_to_tensor(resize_antialiased(square, (128, 128)))[None].to(device)
    with torch.no_grad():
        phi = model.decode(model.encode(x))
        t = time.perf_counter()
        big = render_tiles(model.renderer, phi, (1024, 1024), progress=False)
        t_big = time.perf_counter() - t
        region = render_tiles(model.renderer, phi, (4096, 4096), region=(1536, 1536, 2048, 2048))
    paths = [save_image(x, out / f"{name}_input_128.png"), save_image(big, out / f"{name}_8x_1024.png"),
             save_image(region, out / f"{name}_4096_region.png")]
    print(f"   {name}: 128x128 input -> latent {tuple(model.encode(x).shape[1:])} -> 1024x1024 in {t_big:.1f} s")
    paths += stage2(out, export, args.diffusion_steps)
    paths += superres(out, export, args.superres_steps)
    paths += viewer(out, export)
    summary = {"psnr_1x_before": round(before, 2), "psnr_1x_after": round(after, 2),
               "psnr_rise_db": round(after - before, 2), "steps": args.steps,
               "minutes": round((time.time() - start) / 60, 1), "export": str(export),
               "outputs": [str(p) for p in paths]}
    print("\nOutputs:\n  " + "\n  ".join(summary["outputs"]) + f"\n  autoencoder export: {export}")
    print("  run directory (config, checkpoints, metrics.jsonl): " + str(out / "runs" / "demo_autoencoder"))
    print(json.dumps(summary))
    eval_gen(out, export, args.eval_samples)


if __name__ == "__main__":
    run_as_process(main)
