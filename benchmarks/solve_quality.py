"""Guided sampling (infd/solve/, `infd solve`) on trained models: super-resolution from a low-resolution
image, the multi-scale case, the cost of a guided step, and the memory of a region render with gradients.

    make demo && python benchmarks/solve_quality.py            # the demo's exports (default)
    python benchmarks/solve_quality.py --ae AE_EXPORT --unet UNET_EXPORT --images a.png b.png

Held-out images (default: the two photographs `make demo` holds out) are centre-cropped and resampled to the
--canvas square (the original); their --low x --low version is the condition on the whole canvas.

  super-resolution  per seed (--seeds): the unguided sample and the guided one (same initial noise); the
                    residual to the condition measured on the tiled render at the canvas size (resampled to
                    --low with the project's one rule), and the PSNR against the original. Beside them, not
                    gated: bicubic upsampling of the condition, and z optimised against the condition alone
                    (Adam, no diffusion prior) from the autoencoder's latent of the bicubic image.
  multi-scale       the low-resolution condition alone, then with a --box x --box box of the original at full
                    resolution added: the low-resolution residual (ratio, with / without) and the box's.
  step time         seconds per sampling step: unguided, DPS through the UNet (grad unet), DPS stopped at z0.
  region memory     a 224 x 224 box of a 4096 x 4096 canvas rendered with gradients (to z) over a whole
                    224 x 224 canvas: the bytes held for the backward pass (the activations; on a GPU the
                    peak allocation).

Last line: JSON (sr_residual_ratio, sr_psnr_wins, multiscale_lr_ratio, multiscale_box_ratio,
region_grad_peak_ratio, the per-seed figures, the step times and the settings).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infd.diffusion.generate import generate_latents  # noqa: E402
from infd.diffusion.spec import Conditioning, SamplingSpec  # noqa: E402
from infd.image import pil_to_tensor, resize_antialiased  # noqa: E402
from infd.render import render_tiles  # noqa: E402
from infd.solve.conditions import ImageCondition, RegionGuide  # noqa: E402
from infd.solve.region import render_box  # noqa: E402

DEMO = ROOT / "demo_out" / "runs"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


def originals(paths: list[str], canvas: int) -> list[torch.Tensor]:
    from PIL import Image

    from infd.eval.reconstruction import centre_square

    if paths:
        images = [Image.open(p).convert("RGB") for p in paths]
    else:
        from train.demo import held_out_squares

        images = [img for _, img in held_out_squares(canvas)]
    return [pil_to_tensor(resize_antialiased(centre_square(img), (canvas, canvas))) for img in images]


def low_res(x: torch.Tensor, size: int) -> torch.Tensor:
    from infd.image import tensor_to_pil

    return pil_to_tensor(resize_antialiased(tensor_to_pil(x), (size, size)))


def solve(model, ae, guide, spec, shape, seed, guided: bool = True) -> tuple[torch.Tensor, float]:
    """(the render at the canvas size (3, H, W), seconds of sampling); guided=False: the same seed without the
    conditions."""
    start = time.perf_counter()
    cond = Conditioning([""] if model.text is not None else None, None, guide if guided else None)
    z = generate_latents(model, spec, cond, shape, [seed])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return render_tiles(ae.renderer, ae.decode(z), guide.canvas)[0], seconds


def no_prior(ae, guide, start_image: torch.Tensor, iters: int) -> torch.Tensor:
    """z fitted to the conditions alone (Adam), from the latent of start_image."""
    with torch.no_grad():
        z = ae.encode(start_image[None]).clone()
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(iters):
        opt.zero_grad()
        guide(z).sum().backward()
        opt.step()
    with torch.no_grad():
        return render_tiles(ae.renderer, ae.decode(z), guide.canvas)[0]


def region_memory(ae, canvas: int, latent: int) -> float:
    """MB held for the backward pass (the activations: what grows with a render) of a 224 x 224 box of a
    canvas x canvas render with gradients to z; on a GPU the peak allocation."""
    held = [0]

    def pack(t: torch.Tensor):
        held[0] += t.numel() * t.element_size()
        return t

    z = torch.randn(1, ae.cfg.bottleneck.embed_dim, latent, latent, requires_grad=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rgb = render_box(ae.renderer, ae.decode(z), (canvas, canvas), (0, 0, 224, 224), (224, 224))
    rgb.sum().backward()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return held[0] / 2**20


def text_step_times(model, ae, canvas, shape, steps: int, scale: float) -> dict:
    """Seconds per step of a text condition (a quarter of the canvas scored by CLIP ViT-B-32 at 224 x 224,
    random-init: the time is real, the score means nothing), both DPS gradients."""
    from infd.eval.clip_score import ClipScoreConfig, ClipScorer
    from infd.solve.conditions import TextCondition

    clip = ClipScorer(ClipScoreConfig(model="ViT-B-32", pretrained=None))
    box = (0, 0, canvas[0] // 2, canvas[1] // 2)
    guide = RegionGuide(ae, canvas, [TextCondition(box, "a cat on a sofa")], clip=clip)
    out = {}
    for grad in ("unet", "z0"):
        spec = SamplingSpec(sampler="ddim", steps=steps, guide_scale=scale, guide_grad=grad)
        _, seconds = solve(model, ae, guide, spec, shape, 0)
        out[f"text_clip_randinit_dps_{grad}"] = [seconds / steps]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", default=str(DEMO / "demo_autoencoder" / "export" / "autoencoder"))
    p.add_argument("--unet", default=str(DEMO / "demo_diffusion" / "export" / "unet"))
    p.add_argument("--images", nargs="*", default=[])
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--low", type=int, default=64)
    p.add_argument("--box", type=int, default=64, help="multi-scale: the full-resolution box's side")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--multiscale-seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guide-scale", type=float, default=3.0, help="zeta (3 was best of 0.3-30 on the demo models)")
    p.add_argument("--text-steps", type=int, default=10, help="steps of the timed text-condition run")
    p.add_argument("--multiscale-guide-scale", type=float, default=1.0,
                   help="zeta of the multi-scale runs (of 1, 2, 3 tried on the demo models, see docs/solve.md)")
    p.add_argument("--box-weight", type=float, default=0.25, help="multi-scale: the full-resolution box's weight")
    p.add_argument("--no-prior-iters", type=int, default=200)
    args = p.parse_args()
    from infd.cli.common import open_export
    from infd.cli.sample import latent_diffusion, load_unet

    for path, flag in ((args.ae, "--ae"), (args.unet, "--unet")):
        if not Path(path).is_dir():
            sys.exit(f"{flag} {path}: no such export; run `make demo` first (it writes the default ones) or pass "
                     f"{flag}")
    torch.manual_seed(0)
    unet, record = load_unet(args.unet, "cpu")
    ae, _ = open_export(args.ae, "autoencoder", "--ae", "cpu")
    model = latent_diffusion(unet, record, "cpu")
    latent = ae.cfg.net.resolution // ae.cfg.net.downsample_factor  # the latent size the UNet trained on
    shape = (1, unet.cfg.in_channels, latent, latent)
    canvas = (args.canvas, args.canvas)
    plain_spec = SamplingSpec(sampler="ddim", steps=args.steps)
    guided_spec = SamplingSpec(sampler="ddim", steps=args.steps, guide_scale=args.guide_scale)
    images = originals(args.images, args.canvas)
    rows, times = [], {"unguided": [], "dps_unet": [], "dps_z0": []}
    for k in range(args.seeds):
        original = images[k % len(images)]
        low = low_res(original, args.low)
        guide = RegionGuide(ae, canvas, [ImageCondition((0, 0, *canvas), low)])
        plain, t_plain = solve(model, ae, guide, plain_spec, shape, k, guided=False)
        guided, t_guided = solve(model, ae, guide, guided_spec, shape, k)
        times["unguided"].append(t_plain / args.steps)
        times["dps_unet"].append(t_guided / args.steps)
        bicubic = torch.nn.functional.interpolate(low[None], size=canvas, mode="bicubic", align_corners=False)[0]
        row = {"seed": k, "image": k % len(images),
               "residual_unguided": guide.measured(plain)[0], "residual_guided": guide.measured(guided)[0],
               "psnr_unguided": psnr(plain, original), "psnr_guided": psnr(guided, original),
               "psnr_bicubic": psnr(bicubic, original)}
        if k < len(images):
            row["psnr_no_prior"] = psnr(no_prior(ae, guide, bicubic.clamp(-1, 1), args.no_prior_iters), original)
        rows.append(row)
        print(json.dumps(row), flush=True)
    z0_spec = SamplingSpec(sampler="ddim", steps=args.steps, guide_scale=args.guide_scale, guide_grad="z0")
    first = RegionGuide(ae, canvas, [ImageCondition((0, 0, *canvas), low_res(images[0], args.low))])
    _, t_z0 = solve(model, ae, first, z0_spec, shape, 0)
    times["dps_z0"].append(t_z0 / args.steps)

    ms, ms_spec = [], SamplingSpec(sampler="ddim", steps=args.steps, guide_scale=args.multiscale_guide_scale)
    for k in range(args.multiscale_seeds):
        original = images[k % len(images)]
        low = ImageCondition((0, 0, *canvas), low_res(original, args.low))
        top = left = (args.canvas - args.box) // 2
        box = (top, left, top + args.box, left + args.box)
        high = ImageCondition(box, original[:, box[0]:box[2], box[1]:box[3]].clone(), weight=args.box_weight)
        lr_only, _ = solve(model, ae, RegionGuide(ae, canvas, [low]), ms_spec, shape, 100 + k)
        both, _ = solve(model, ae, RegionGuide(ae, canvas, [low, high]), ms_spec, shape, 100 + k)
        measure = RegionGuide(ae, canvas, [low, high])
        a, b = measure.measured(lr_only), measure.measured(both)
        ms.append({"seed": 100 + k, "lr_residual_lr_only": a[0], "lr_residual_both": b[0],
                   "box_residual_lr_only": a[1], "box_residual_both": b[1]})
        print(json.dumps(ms[-1]), flush=True)

    times |= text_step_times(model, ae, canvas, shape, args.text_steps, args.guide_scale)
    peak_box, peak_small = region_memory(ae, 4096, latent), region_memory(ae, 224, latent)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ratio = lambda rows, a, b: mean([r[a] for r in rows]) / mean([r[b] for r in rows])  # noqa: E731
    result = {
        "sr_residual_ratio": ratio(rows, "residual_guided", "residual_unguided"),
        "sr_psnr_wins": sum(r["psnr_guided"] >= r["psnr_unguided"] for r in rows), "sr_seeds": len(rows),
        "multiscale_lr_ratio": ratio(ms, "lr_residual_both", "lr_residual_lr_only"),
        "multiscale_box_ratio": ratio(ms, "box_residual_both", "box_residual_lr_only"),
        "region_grad_peak_ratio": peak_box / peak_small, "region_grad_mb": [peak_box, peak_small],
        "psnr_mean": {k: mean([r[k] for r in rows if k in r]) for k in
                      ("psnr_unguided", "psnr_guided", "psnr_bicubic", "psnr_no_prior")},
        "seconds_per_step": {k: mean(v) for k, v in times.items()},
        "rows": rows, "multiscale": ms, "settings": vars(args),
        "models": "the demo's (200 diffusion steps on 17 photographs; random-init text tower): a plumbing check",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
