"""One text-to-image sample end to end, at 1024 and at 2048: sampler steps, decode, render, each with
its seconds and MFU.

The model is the paper's pair at full size, random init (the weights cannot be downloaded: the FLOPs
are the paper models', the pixels are not): the paper UNet (conf/unet/paper.yaml) with cross-attention
to a random-init OpenCLIP ViT-B-32 text tower (context 512), and the paper autoencoder
(conf/model/infd_paper.yaml). One 64x64 latent is sampled once (DDIM, --steps steps, classifier-free
guidance --cfg-scale: two UNet evaluations per step), decoded once to phi, and rendered at each size
with render_tiles (batched, --render-precision). The latent does not grow with the output size: only
the render does, which is the point of a neural field.

Per phase: seconds, and MFU (FLOPs from torch's FLOP counter: one sampler step, the decode, one
renderer call per window shape times its windows; over the device's measured peak in the phase's
dtype, infd/utils/mfu.py). On a CPU --steps defaults to 10 (the figures per step hold for 50).

    python benchmarks/sample_throughput.py                # about 5 minutes on 2 CPU cores
    python benchmarks/sample_throughput.py --sizes 256 --steps 2 --small   # seconds: checks the script

Last line: one JSON object (steps, s_per_step, decode_s, render_s per size, end_to_end_s per size with the
sampler at --steps and extrapolated to 50 steps, and the MFU of each phase).
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

from benchmarks.render_throughput import render_flops  # noqa: E402
from infd.config import from_mapping, load_mapping  # noqa: E402
from infd.diffusion.generate import LatentDiffusion, generate_latents  # noqa: E402
from infd.diffusion.schedule import DiffusionConfig  # noqa: E402
from infd.diffusion.spec import Conditioning, SamplingSpec  # noqa: E402
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder  # noqa: E402
from infd.models.unet import UNet, UNetConfig  # noqa: E402
from infd.render import RenderOptions, render_tiles  # noqa: E402
from infd.text import TextEncoderConfig, build_text_encoder  # noqa: E402
from infd.utils.mfu import count_flops, measure_peak, mfu  # noqa: E402

PROMPT = "a photograph of a lighthouse on a cliff at sunset"


def build(args, device: torch.device):
    torch.manual_seed(0)
    unet_cfg = from_mapping(UNetConfig, load_mapping(str(ROOT / "conf/unet/paper.yaml")) | {"context_dim": 512})
    ae_cfg = from_mapping(AutoencoderConfig, load_mapping(str(ROOT / "conf/model/infd_paper.yaml")))
    if args.small:  # checks the script in seconds
        unet_cfg = from_mapping(UNetConfig, {"ch": 32, "ch_mult": [1, 2], "attn_ds": [2], "head_channels": 16,
                                             "in_channels": 3, "context_dim": 512})
    unet = UNet(unet_cfg).to(device).eval()
    text = build_text_encoder(TextEncoderConfig(kind="openclip", pretrained=None)).to(device).eval()
    ae = NeuralFieldAutoencoder(ae_cfg).to(device).eval()
    return LatentDiffusion(unet, DiffusionConfig(latent_scale=1.0), text), ae


def timed(work, device):
    start = time.perf_counter()
    out = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--steps", type=int, help="DDIM steps (default: 50 on a GPU, 10 on a CPU)")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--latent-size", type=int, default=64)
    p.add_argument("--render-precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--small", action="store_true", help="a small UNet: checks the script")
    args = p.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (50 if device.type == "cuda" else 10)
    peak = measure_peak(device, torch.float32)
    render_peak = measure_peak(device, torch.bfloat16) if args.render_precision == "bf16" else peak
    model, ae = build(args, device)
    shape = (1, model.unet.cfg.in_channels, args.latent_size, args.latent_size)
    cond = Conditioning([PROMPT])
    spec = SamplingSpec(sampler="ddim", steps=steps, cfg_scale=args.cfg_scale)
    with torch.no_grad():
        # The prompt is encoded once per sample (the prompt and the empty one): counted once, not per step.
        text_flops = count_flops(lambda: (model.text([PROMPT]), model.text([""])))
        one_step = count_flops(lambda: generate_latents(model, SamplingSpec("ddim", 1, cfg_scale=args.cfg_scale),
                                                        cond, shape, 0))
        sampler_flops = text_flops + steps * (one_step - text_flops)
        z, sample_s = timed(lambda: generate_latents(model, spec, cond, shape, 0, progress=True), device)
        phi, decode_s = timed(lambda: ae.decode(z), device)
        decode_flops = count_flops(lambda: ae.decode(z))
        options = RenderOptions(precision=args.render_precision)
        renders = {}
        for size in args.sizes:
            flops = render_flops(ae.renderer, phi, size, options)
            _, seconds = timed(lambda: render_tiles(ae.renderer, phi, (size, size), options=options, progress=True),
                               device)
            renders[size] = {"seconds": round(seconds, 2), "megapixels_per_s": round(size * size / 1e6 / seconds, 4),
                             "mfu": round(mfu(flops, seconds, render_peak), 4)}
            print(f"render {size}: {json.dumps(renders[size])}", flush=True)
    s_per_step = sample_s / steps
    result = {
        "device": str(device), "weights": "random init", "steps": steps, "cfg_scale": args.cfg_scale,
        "latent": list(shape), "s_per_step": round(s_per_step, 3), "sampler_s": round(sample_s, 2),
        "sampler_mfu": round(mfu(sampler_flops, sample_s, peak), 4), "text_share_of_a_step": round(
            text_flops / (one_step - text_flops), 4),
        "decode_s": round(decode_s, 3), "decode_mfu": round(mfu(decode_flops, decode_s, peak), 4),
        "render": renders, "render_precision": args.render_precision,
        "end_to_end_s": {size: round(sample_s + decode_s + r["seconds"], 2) for size, r in renders.items()},
        "end_to_end_s_at_50_steps": {size: round(50 * s_per_step + decode_s + r["seconds"], 2)
                                     for size, r in renders.items()},
        "peak_tflops": round(peak.flops_per_s / 1e12, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
