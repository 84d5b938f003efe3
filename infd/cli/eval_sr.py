"""`infd eval-sr`: super-resolution of held-out images at several scales against their originals.

    infd eval-sr --ae AE --unet SR_UNET --data SHARDS --num-images 100 --scales 2 4 8 16 --out eval_sr/
    torchrun --nproc_per_node 8 -m infd.cli eval-sr --ae AE --unet SR_UNET --guided-unet UNET --data SHARDS ...

Methods: bicubic and the autoencoder alone (always), the super-resolution UNet (--unet: `diffusion`, and with
--methods the same with its condition zeroed, `diffusion_nocond`), and zero-shot guided sampling with a plain
UNet (--guided-unet: `guided`). PSNR, LPIPS, FID (against the originals) and lr_rmse (the output downscaled
back, against the input) per method and scale (infd/eval/superres.py). Image i has seed --seed + i whatever
the number of ranks. stdout carries one JSON object (rank 0); --out keeps it (metrics.json) and, per scale, the
first image's input, results and original side by side (examples_xS.png).
"""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from infd.cli.common import add_render_flags, render_options
from infd.config import ConfigError, from_mapping


def add_parser(sub, command, device_help: str) -> None:
    from infd.cli.sample import add_sampling_flags
    from infd.diffusion.spec import SamplingSpec
    from infd.eval.superres import METHODS

    p = command(sub, "eval-sr", "PSNR, LPIPS and FID of super-resolved held-out images at several scales, for the "
                "diffusion path, bicubic, the autoencoder alone and guided sampling (sharded over ranks)", cmd_eval_sr)
    p.add_argument("--ae", required=True, help="autoencoder export (the one the UNets were trained with)")
    p.add_argument("--unet", help="super-resolution UNet export (unet.lowres_channels): the diffusion method")
    p.add_argument("--guided-unet", help="plain UNet export: zero-shot super-resolution by guided sampling")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="held-out images as indexed shards (patterns, directories or "
                        "s3:// prefixes): the first --num-images with a short side >= --size")
    source.add_argument("--images", help="held-out images as a folder of image files (sorted by name)")
    p.add_argument("--index", help="index directory of --data (default: beside the shards)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="methods measured (default: bicubic, ae, "
                   "and diffusion with --unet, guided with --guided-unet)")
    p.add_argument("--scales", type=int, nargs="+", default=[2, 4, 8, 16], help="downscaling factors")
    p.add_argument("--size", type=int, default=256, help="side of the originals (centre squares)")
    p.add_argument("--num-images", type=int, default=100, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="image i is sampled with seed --seed + i")
    p.add_argument("--batch-size", type=int, default=4, help="images upsampled at once per rank")
    p.add_argument("--lpips", default="pretrained", help="LPIPS backbone: pretrained | random (named lpips_randinit) "
                   "| PATH to VGG16 weights | none")
    p.add_argument("--features", choices=["inception", "randinit"], default="inception",
                   help="FID feature network (randinit: offline; the metric is then named fid_randinit)")
    p.add_argument("--feature-dim", type=int, default=2048, help="feature size (Inception: 64, 192, 768, 2048)")
    p.add_argument("--inception-weights", help="local Inception weights file (default: the torch hub cache)")
    add_sampling_flags(p)
    guide = SamplingSpec()
    p.add_argument("--guide-steps", type=int, help="sampling steps of the guided method (default: --steps)")
    p.add_argument("--guide-scale", type=float, default=guide.guide_scale, help="guided method: DPS's zeta")
    p.add_argument("--guide-grad", choices=["unet", "z0"], default=guide.guide_grad,
                   help="guided method: the gradient through the UNet (true DPS) or stopped at z0")
    add_render_flags(p)
    p.add_argument("--out", help="folder for metrics.json and examples_xS.png (default: none written)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", help=device_help)


def eval_config(args):
    from infd.eval.superres import SREvalConfig

    cfg = from_mapping(SREvalConfig, {
        "size": args.size, "scales": args.scales, "num_images": args.num_images, "seed": args.seed,
        "batch_size": args.batch_size,
        "features": {"kind": args.features, "dim": args.feature_dim, "weights": args.inception_weights or ""}})
    cfg.validate("--")
    return cfg


def methods_of(args) -> list[str]:
    """The methods to measure; one whose model is not given is a ConfigError naming the flag."""
    default = ["bicubic", "ae"] + (["diffusion"] if args.unet else []) + (["guided"] if args.guided_unet else [])
    methods = args.methods or default
    for name, flag, given in (("diffusion", "--unet", args.unet), ("diffusion_nocond", "--unet", args.unet),
                              ("guided", "--guided-unet", args.guided_unet)):
        if name in methods and not given:
            raise ConfigError(f"--methods {name} needs {flag}")
    return methods


def build_upsamplers(args, methods: list[str], ae, dev, rank: int) -> dict:
    """{method: Upsample} (infd.eval.superres)."""
    from infd.cli.eval_gen import note
    from infd.cli.render import superres_resolver
    from infd.eval.superres import FieldUpsample, bicubic

    options = render_options(args)
    resolver = None
    if args.unet:
        resolver, line = superres_resolver(args, ae, f"--ae {args.ae}", dev)
        note(line, rank)
    out = {}
    for name in methods:
        if name == "bicubic":
            out[name] = bicubic
        elif name == "guided":
            out[name] = _guided(args, ae, dev, options)
        else:
            out[name] = FieldUpsample(ae, options, None if name == "ae" else resolver, name == "diffusion_nocond")
    return out


def _guided(args, ae, dev, options):
    from dataclasses import replace

    from infd.cli.sample import check_sampling, latent_diffusion, latent_size, load_unet, resolve_sampling
    from infd.eval.superres import GuidedUpsample

    unet, record = load_unet(args.guided_unet, dev)
    if unet.cfg.lowres_channels:
        raise ConfigError(f"--guided-unet {args.guided_unet} is a super-resolution UNet: give it as --unet; guided "
                          "sampling steers a plain UNet")
    spec, _ = resolve_sampling(args, record.sampling, record.schedule().objective == "rectified_flow")
    if args.guide_steps is not None and args.guide_steps < 1:
        raise ConfigError(f"--guide-steps {args.guide_steps}: expected at least 1")
    spec = replace(spec, steps=args.guide_steps or spec.steps, guide_scale=args.guide_scale,
                   guide_grad=args.guide_grad)
    check_sampling(spec, record.schedule())
    if spec.sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"--sampler {spec.sampler}: guided sampling (--guided-unet) runs ddim or ddpm steps")
    latent = latent_size(Namespace(latent_size=None), unet, ae)
    return GuidedUpsample(latent_diffusion(unet, record, dev), ae, spec, latent, options)


def held_out(args, cfg):
    from infd.eval.real_set import choose_real_set, image_folder, open_source

    if args.images:
        return image_folder(args.images, cfg.num_images)
    return choose_real_set(open_source(args.data, args.index), cfg.num_images, cfg.size)


def write_examples(examples: dict, methods: list[str], scales: list[int], out: Path) -> list[str]:
    """Per scale, one row: the input (nearest-neighbour enlarged), each method's result, the original."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid

    from infd.image import save_image

    if ("original", 0) not in examples:  # image 0 was unreadable
        return []
    original, written = examples[("original", 0)], []
    for s in scales:
        low = F.interpolate(examples[("input", s)][None], size=original.shape[-2:], mode="nearest")[0]
        row = [low, *(examples[(m, s)] for m in methods), original]
        path = save_image(make_grid(row, nrow=len(row), padding=2, pad_value=1.0), out / f"examples_x{s}.png")
        written.append(str(path))
    return written


def cmd_eval_sr(args) -> int:
    from infd.cli.common import open_export
    from infd.cli.eval_gen import note, ranks
    from infd.eval.features import build_feature_extractor
    from infd.eval.superres import evaluate_superres
    from infd.losses import build_lpips

    cfg = eval_config(args)  # user mistakes first, before any model loads or process group starts
    methods = methods_of(args)
    with ranks(args.device) as (rank, world, dev):
        ae, _ = open_export(args.ae, "autoencoder", "--ae", dev)
        upsamplers = build_upsamplers(args, methods, ae, dev, rank)
        images = held_out(args, cfg)
        lpips_net = None if args.lpips == "none" else build_lpips(args.lpips).to(dev).eval()
        extractor = build_feature_extractor(cfg.features, "--features.").to(dev)
        note(f"{len(images.ids)} held-out images at {cfg.size} px, scales {cfg.scales}, methods {methods}, over "
             f"{world} rank(s)", rank)
        result = evaluate_superres(images, upsamplers, cfg, extractor, lpips_net, dev, rank, world, not args.quiet)
        if rank == 0:
            write_result(result, args, cfg, methods, world)
    return 0


def write_result(result, args, cfg, methods: list[str], world: int) -> None:
    """The JSON line on stdout; with --out also metrics.json and the example rows."""
    metrics = result.metrics | {"world_size": world, "lpips_backbone": args.lpips, "features": cfg.features.kind}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        metrics["examples"] = write_examples(result.examples, methods, cfg.scales, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics), flush=True)
