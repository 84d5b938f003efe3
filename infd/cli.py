"""The `infd` command: inspect models and render with them.

    infd describe MODEL_CONFIG [--json] [--input-size 256]
    infd upsample IMAGE --ckpt EXPORT (--scale S | --size WxH) --out OUT [--region x0,y0,x1,y1]
    infd eval-ae --ckpt EXPORT --data SHARDS [--limit N] [--lpips pretrained|random|PATH]
    infd sample --ae EXPORT --unet EXPORT [--prompt TEXT | --prompts FILE] [--label K] --size WxH
                [--region x0,y0,x1,y1] [--steps N] [--sampler ddim|ddpm|dpmpp|euler|heun] [--eta E]
                [--spacing linspace|leading|trailing] [--cfg S] [--seed K] --out FILE
    infd data stats INDEX_OR_SHARDS [--png HIST.png] [--json]
    infd data preview SHARDS --out GRID.png [--n 8] [--p-hr 0.5] [--index DIR] [--patch-size 256]
"""
from __future__ import annotations

import argparse
import json
import sys

from infd.config import ConfigError, from_mapping, load_mapping


def cmd_describe(args) -> int:
    from infd.describe import describe_autoencoder
    from infd.models import AutoencoderConfig

    info = describe_autoencoder(from_mapping(AutoencoderConfig, load_mapping(args.config)), args.input_size)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.config}: {info['bottleneck']} bottleneck, {info['renderer']} renderer")
    for name, count in info["params"].items():
        print(f"  {name:<11s}{count / 1e6:10.3f} M")
    size = args.input_size
    print(f"  input {size}x{size} -> latent {'x'.join(map(str, info['latent_shape']))}"
          f" -> phi {'x'.join(map(str, info['phi_shape']))}")
    return 0


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 4096x4096") from None
    return h, w


def parse_region(text: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' (pixels of the output) -> (top, left, bottom, right)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--region {text!r}: expected x0,y0,x1,y1 in output pixels") from None
    return y0, x0, y1, x1


def cmd_upsample(args) -> int:
    import time

    import torch
    from PIL import Image

    from infd.export import load_model
    from infd.image import pil_to_tensor, resize_antialiased, save_image
    from infd.render import render_tiles

    device = _device(args.device)
    model = load_model(args.ckpt, device)
    img = Image.open(args.image)
    img.load()
    if args.size:
        size = parse_size(args.size)
    else:
        size = (round(img.height * args.scale), round(img.width * args.scale))
    region = parse_region(args.region) if args.region else None
    # The field covers the whole image in [-1, 1]^2 whatever its aspect: encode a square resize at
    # the model's input size, render at the requested (H, W).
    enc = model.cfg.net.resolution
    x = pil_to_tensor(resize_antialiased(img.convert("RGB"), (enc, enc)))[None].to(device)
    start = time.perf_counter()
    with torch.no_grad():
        phi = model.decode(model.encode(x))
        out = render_tiles(model.renderer, phi, size, region=region, tile=args.tile, progress=True)
    path = save_image(out, args.out)
    print(f"{args.image} ({img.width}x{img.height}) -> {path} ({out.shape[-1]}x{out.shape[-2]}) in "
          f"{time.perf_counter() - start:.1f} s on {device}")
    return 0


def cmd_eval_ae(args) -> int:
    from infd.evaluate import evaluate_autoencoder, iterate_images
    from infd.export import load_model
    from infd.losses import build_lpips

    device = _device(args.device)
    model = load_model(args.ckpt, device)
    lpips_net = None
    if args.lpips != "none":
        lpips_net = build_lpips(args.lpips).to(device)
    result = evaluate_autoencoder(model, iterate_images(args.data, args.limit), device,
                                  scales=tuple(args.scales), base=model.cfg.net.resolution, lpips_net=lpips_net)
    if lpips_net is not None and lpips_net.is_random_init and "lpips_1x" in result:
        result["lpips_1x_randinit"] = result.pop("lpips_1x")  # not a perceptual metric: say so
    print(json.dumps(result))
    return 0


# `infd sample` without --sampler/--steps/--eta/--spacing and without recorded defaults in the export.
SAMPLING_DEFAULTS = {"sampler": "ddim", "steps": 50, "eta": 0.0, "spacing": "linspace"}


def resolve_sampling(args, recorded: dict) -> tuple[dict, str]:
    """The sampling options {"sampler", "steps", "eta", "spacing"} and where the unset ones came
    from. The export's recorded options (`extra["sampling"]`) are one bundle: they fill in unset
    flags unless --sampler picks another sampler (an eta or spacing recorded for ddim would not fit
    dpmpp), in which case the built-in defaults do."""
    recorded = {**SAMPLING_DEFAULTS, **recorded} if recorded else {}
    base, source = SAMPLING_DEFAULTS, "built-in defaults"
    if recorded and args.sampler in (None, recorded["sampler"]):
        base, source = recorded, "the UNet export's defaults"
    given = {k: getattr(args, k) for k in SAMPLING_DEFAULTS}
    return {k: base[k] if given[k] is None else given[k] for k in SAMPLING_DEFAULTS}, source


def check_sampling(options: dict, diffusion_cfg) -> None:
    """ConfigError (exit 2, no traceback) for options the sampler does not take, a bad spacing or
    step count: checked before any sampling starts."""
    from infd.diffusion.samplers import check_options, vp_timesteps
    from infd.diffusion.schedule import build_schedule

    schedule = build_schedule(diffusion_cfg)
    try:
        check_options(schedule, options["sampler"], options["eta"], options["spacing"])
        if options["sampler"] in ("ddim", "ddpm"):
            vp_timesteps(schedule, options["steps"], options["spacing"])
        elif options["steps"] < 1:
            raise ValueError(f"--steps {options['steps']}: expected at least 1")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cmd_sample(args) -> int:
    from pathlib import Path

    import torch

    from infd.config import from_mapping
    from infd.diffusion.schedule import DiffusionConfig
    from infd.export import load_model
    from infd.image import save_image
    from infd.render import render_tiles
    from infd.sampling import generate_latents
    from infd.text import TextEncoderConfig, build_text_encoder

    device = _device(args.device)
    ae, unet = load_model(args.ae, device), load_model(args.unet, device)
    extra = unet.export_extra
    diffusion_cfg = from_mapping(DiffusionConfig, extra.get("diffusion", {}))
    options, source = resolve_sampling(args, extra.get("sampling", {}))
    check_sampling(options, diffusion_cfg)
    print(f"sampler {options['sampler']}, {options['steps']} steps, eta {options['eta']}, spacing "
          f"{options['spacing']} (unset options: {source})", flush=True)
    text = build_text_encoder(from_mapping(TextEncoderConfig, extra.get("text", {})))
    text = text.to(device) if text is not None else None
    prompts = [args.prompt or ""]
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    size = parse_size(args.size)
    region = parse_region(args.region) if args.region else None
    latent = ae.cfg.net.resolution // ae.cfg.net.downsample_factor
    out = Path(args.out)
    for i, prompt in enumerate(prompts):
        labels = torch.tensor([args.label], device=device) if args.label is not None else None
        if labels is not None and not unet.cfg.num_classes:
            raise ConfigError("--label needs a class-conditional UNet (its num_classes is 0)")
        z = generate_latents(unet, diffusion_cfg, extra["latent_scale"], (1, unet.cfg.in_channels, latent, latent),
                             [prompt] if text is not None else None, text, args.cfg, options["sampler"],
                             options["steps"], seed=args.seed + i, device=device, progress=True, labels=labels,
                             eta=options["eta"], spacing=options["spacing"])
        with torch.no_grad():
            image = render_tiles(ae.renderer, ae.decode(z), size, region=region, progress=True)
        path = out if len(prompts) == 1 else out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
        save_image(image, path)
        print(f"{prompt!r} -> {path} ({image.shape[-1]}x{image.shape[-2]}, seed {args.seed + i})", flush=True)
    return 0


def cmd_data_stats(args) -> int:
    from infd.data.inspect import histogram_png, index_stats
    from infd.data.sample_index import INDEX_NAME, open_index

    where = args.source[: -len(INDEX_NAME)].rstrip("/") if args.source.endswith(INDEX_NAME) else args.source
    stats = index_stats(open_index(where))
    if args.png:
        histogram_png(stats, args.png)
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{where}: {stats['samples']} samples in {stats['shards']} shards, {stats['bytes'] / 2**20:.1f} MB")
    print(f"  high-res (long side >= {stats['hr_threshold']} px): {stats['high_res']}; median long side "
          f"{stats['long_side_median']} px")
    print(f"  excluded at indexing: {stats['excluded']} {stats['excluded_by_reason']}")
    if stats["build"]:
        print(f"  build_shards: skipped {stats['build']['skipped']}, converted {stats['build']['converted']}")
    hist = stats["resolution_histogram"]
    for edge, count in zip(hist["edges"], hist["counts"]):
        print(f"  >= {edge:>5d} px  {count}")
    if args.png:
        print(f"  histogram: {args.png}")
    return 0


def cmd_data_preview(args) -> int:
    from infd.data.inspect import preview_grid
    from infd.data.loader import DataConfig, build_loader

    cfg = from_mapping(DataConfig, {"shards": args.shards, "index": args.index, "p_hr": args.p_hr, "num_workers": 0,
                                    "batch_size": 1, "seed": args.seed,
                                    "patch": {"patch_size": args.patch_size, "encoder_size": args.patch_size}})
    batches = iter(build_loader(cfg))
    path = preview_grid(batches, args.n, args.out)
    batches.close()
    print(f"{args.n} loader samples (encoder input | GT crop) -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infd", description="Image neural field diffusion tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("describe", help="parameter counts and latent/feature shapes of a model config")
    p.add_argument("config", help="model config (YAML or JSON), e.g. conf/model/infd_paper.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--input-size", type=int, default=256)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("upsample", help="render an existing image at any scale or size through an autoencoder")
    p.add_argument("image")
    p.add_argument("--ckpt", required=True, help="autoencoder export directory (model.safetensors + config.json)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--scale", type=float)
    group.add_argument("--size", help="WIDTHxHEIGHT of the output")
    p.add_argument("--region", help="x0,y0,x1,y1: render only this box of the output")
    p.add_argument("--out", required=True)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--device")
    p.set_defaults(func=cmd_upsample)

    p = sub.add_parser("eval-ae", help="PSNR at 1x/2x/4x, LPIPS and scale consistency of an autoencoder")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, nargs="+", help="shards: patterns, directories or s3:// prefixes")
    p.add_argument("--limit", type=int)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lpips", default="pretrained", help="pretrained | random (labelled randinit) | PATH | none")
    p.add_argument("--device")
    p.set_defaults(func=cmd_eval_ae)

    p = sub.add_parser("sample", help="generate images at any resolution (or a region) from a trained UNet")
    p.add_argument("--ae", required=True, help="autoencoder export")
    p.add_argument("--unet", required=True, help="UNet export (carries its latent scale, objective, text encoder)")
    p.add_argument("--prompt")
    p.add_argument("--prompts", help="file with one prompt per line (one image each)")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of the output")
    p.add_argument("--region", help="x0,y0,x1,y1: render only this box of the output")
    # Sampling options default to None: unset ones come from the export, else SAMPLING_DEFAULTS.
    recorded = "default: the UNet export's recorded choice, else"
    p.add_argument("--steps", type=int, help=f"sampling steps ({recorded} 50)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp", "euler", "heun"], help=f"{recorded} ddim")
    p.add_argument("--eta", type=float, help=f"DDIM noise, 0 deterministic .. 1 ancestral; ddim only ({recorded} 0.0)")
    p.add_argument("--spacing", choices=["linspace", "leading", "trailing"],
                   help=f"timesteps of ddim/ddpm: leading is the official LDM/INFD stride ({recorded} linspace)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--label", type=int, help="class label, for class-conditional UNets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--device")
    p.set_defaults(func=cmd_sample)

    data = sub.add_parser("data", help="look at a dataset: index statistics, loader preview").add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("stats", help="totals, resolution histogram, exclusion and build counts of a sample index")
    p.add_argument("source", help="index directory, its index.json, or the shards' directory (local or s3://)")
    p.add_argument("--png", help="also write the resolution histogram as a PNG here (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("preview", help="a grid of what the loader produces: encoder inputs beside GT crops")
    p.add_argument("shards", nargs="+", help="shards: patterns, directories or s3:// prefixes")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=8, help="samples shown (default: 8)")
    p.add_argument("--p-hr", type=float, default=0.5, help="share drawn from the high-res stream (default: 0.5)")
    p.add_argument("--index", help="index directory (default: beside the shards)")
    p.add_argument("--seed", type=int, default=0, help="loader seed (default: 0)")
    p.add_argument("--patch-size", type=int, default=256, help="GT crop and encoder input size P (default: 256)")
    p.set_defaults(func=cmd_data_preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"infd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
