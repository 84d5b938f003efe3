"""The `infd` command: inspect models and render with them.

    infd --version
    infd describe [MODEL_CONFIG] [--init SD_OR_LDM_PATH [--format auto|diffusers|ldm]] [--json] [--input-size 256]
    infd upsample IMAGE_OR_FOLDER --ckpt EXPORT (--scale S | --size WxH) --out OUT [--region x0,y0,x1,y1]
                  [--unet SR_EXPORT [--num-images N] [--seed K] [--steps N]]
    infd eval-ae --ckpt EXPORT --data SHARDS [--limit N] [--lpips pretrained|random|PATH]
    infd sample --unet EXPORT [--ae EXPORT] [--prompt TEXT | --prompts FILE] [--label K] --size WxH
                [--num-images N] [--batch-size B] [--region x0,y0,x1,y1] [--steps N]
                [--sampler ddim|ddpm|dpmpp|euler|heun] [--eta E] [--spacing linspace|leading|trailing]
                [--cfg S] [--seed K] --out FILE.png|DIR
    infd eval-gen --unet EXPORT [--ae EXPORT] --data REAL_SHARDS --num-samples N --out DIR
                  [--features inception|randinit]
                  [--patches 256 512 1024] [--fid-size 256] [--prompts FILE] [--seed K]   (torchrun for ranks)
    infd eval-sr --ae EXPORT [--unet SR_EXPORT] [--guided-unet EXPORT] (--data SHARDS | --images FOLDER)
                 [--scales 2 4 8 16] [--size 256] [--num-images N] [--out DIR]             (torchrun for ranks)
    infd view (--ae EXPORT (--image IMG | --latents FILE) | --unet EXPORT [--prompt P] [--seed K])
              [--canvas 16384x16384] [--host 127.0.0.1] [--port 8765]      (a deep-zoom page in the browser)
    infd data stats INDEX_OR_SHARDS [--png HIST.png] [--json]
    infd data preview SHARDS --out GRID.png [--n 8] [--p-hr 0.5] [--index DIR] [--patch-size 256]

Every option's default is in `infd CMD --help`. A user mistake (a missing or unreadable input, a
bad option value, options that do not fit the model) ends as `infd CMD: error: MESSAGE` on
stderr with exit code 2, never a traceback. The commands live in this package's render, sample,
eval_gen, eval_sr, solve and view modules; what they share in common.
"""
from __future__ import annotations

import argparse
import json
import sys

from infd.cli import eval_gen, eval_sr, render, sample, solve, view
from infd.cli.common import HelpFormatter, add_render_flags
from infd.config import ConfigError, from_mapping, load_mapping
from infd.utils.process_main import run_as_process


def cmd_describe(args) -> int:
    from infd.describe import describe_autoencoder
    from infd.models import AutoencoderConfig

    if args.config is None and args.init is None:
        raise ConfigError("give a MODEL_CONFIG, or --init PATH to describe a converted autoencoder")
    raw = load_mapping(args.config) if args.config else {}
    if args.init is not None:  # the shortcut: model.init on the given (or default) config
        raw["init"] = {**raw.get("init", {}), "autoencoder": args.init, "format": args.format}
    info = describe_autoencoder(from_mapping(AutoencoderConfig, raw), args.input_size)
    if args.json:
        print(json.dumps(info))
        return 0
    name = args.config or "default config"
    print(f"{name}: {info['bottleneck']} bottleneck, {info['renderer']} renderer")
    if info["source"]:
        src = info["source"]
        print(f"  converted from {src['path']} ({src['format']}, {src['class']}; weights {src['weights']})")
        print(f"  dropped decoder tail: {', '.join(src['dropped_tail']) or 'none found'}; "
              f"renderer {src['renderer']}; freeze_encoder {info['freeze_encoder']}")
    for name, count in info["params"].items():
        print(f"  {name:<11s}{count / 1e6:10.3f} M")
    size = args.input_size
    print(f"  input {size}x{size} -> latent {'x'.join(map(str, info['latent_shape']))} (f{info['downsample_factor']})"
          f" -> phi {'x'.join(map(str, info['phi_shape']))}")
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


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("infd")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infd", description="Image neural field diffusion tools.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, text: str, func) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if func is not None:
            p.set_defaults(func=func, prog=p.prog)
        return p

    device = "torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)"
    p = command(sub, "describe", "parameter counts and latent/feature shapes of a model config", cmd_describe)
    p.add_argument("config", nargs="?", help="model config (YAML or JSON), e.g. conf/model/infd_paper.yaml; "
                   "optional with --init (default: the built-in AutoencoderConfig)")
    p.add_argument("--init", help="describe the autoencoder converted from this SD/LDM source (sets model.init."
                   "autoencoder): a diffusers folder or an LDM checkpoint file (default: the config's)")
    p.add_argument("--format", choices=["auto", "diffusers", "ldm"], default="auto",
                   help="layout of --init: auto = a directory is diffusers, a file is ldm")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--input-size", type=int, default=256, help="side of the square input image, in pixels")

    p = command(sub, "upsample", "render an existing image at any scale or size through an autoencoder",
                render.cmd_upsample)
    p.add_argument("image", help="input image (any format PIL reads; its EXIF orientation is applied)")
    p.add_argument("--ckpt", required=True, help="autoencoder export directory (model.safetensors + config.json)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--scale", type=float, help="output size = the (upright) input size x this factor")
    group.add_argument("--size", help="WIDTHxHEIGHT of the output")
    p.add_argument("--region", help="x0,y0,x1,y1: render only this box of the output (default: all of it)")
    p.add_argument("--out", required=True, help="output image file (its suffix picks the format); a folder for a "
                   "folder of inputs or --num-images > 1")
    p.add_argument("--unet", help="a super-resolution UNet export (unet.lowres_channels): sample the latent "
                   "conditioned on the input (default: the autoencoder alone)")
    p.add_argument("--num-images", type=int, default=1, help="with --unet: results per input, seeds --seed + k")
    p.add_argument("--seed", type=int, default=0, help="with --unet: the first result's seed")
    sample.add_sampling_flags(p)
    add_render_flags(p)
    p.add_argument("--device", help=device)

    p = command(sub, "eval-ae", "PSNR at 1x/2x/4x, LPIPS and scale consistency of an autoencoder",
                render.cmd_eval_ae)
    p.add_argument("--ckpt", required=True, help="autoencoder export directory")
    p.add_argument("--data", required=True, nargs="+", help="shards: patterns, directories or s3:// prefixes")
    p.add_argument("--limit", type=int, help="evaluate at most this many images (default: all)")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="upscaling factors measured")
    p.add_argument("--lpips", default="pretrained", help="LPIPS backbone: pretrained | random (labelled randinit) "
                   "| PATH to VGG16 weights | none")
    p.add_argument("--device", help=device)

    p = command(sub, "sample", "generate images at any resolution (or a region) from a trained UNet",
                sample.cmd_sample)
    p.add_argument("--unet", required=True, help="UNet export (carries its latent scale, objective, text encoder), "
                   "or a Stable Diffusion folder (diffusers layout) used as it is, with --ae")
    p.add_argument("--ae", help="autoencoder export (default: the one the UNet export records)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text prompt, for text-conditioned UNets (default: the empty prompt)")
    prompt.add_argument("--prompts", help="file with one prompt per line (--num-images images each)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="images sampled at once; image k is the same "
                   "whatever the batch size (its own noise, seed --seed + k)")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of each output image")
    p.add_argument("--region", help="x0,y0,x1,y1: render only this box of each output (default: all of it)")
    p.add_argument("--latent-size", type=int, help="side of the sampled latent (default: a diffusers UNet's "
                   "sample_size, else the autoencoder's latent at its input size); --size stays free")
    sample.add_sampling_flags(p)
    p.add_argument("--label", type=int, help="class label, for class-conditional UNets (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--out", required=True, help="an image file (one image, or a grid of all of them), or any "
                   "other path: a folder of 0000.png, 0001.png, ...")
    add_render_flags(p)
    p.add_argument("--device", help=device)

    eval_gen.add_parser(sub, command, device)
    eval_sr.add_parser(sub, command, device)
    solve.add_parser(sub, command, device)
    view.add_parser(sub, command, device)

    data = command(sub, "data", "look at a dataset: index statistics, loader preview", None).add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    p = command(data, "stats", "totals, resolution histogram, exclusion and build counts of a sample index",
                cmd_data_stats)
    p.add_argument("source", help="index directory, its index.json, or the shards' directory (local or s3://)")
    p.add_argument("--png", help="also write the resolution histogram as a PNG here (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = command(data, "preview", "a grid of what the loader produces: encoder inputs beside GT crops",
                cmd_data_preview)
    p.add_argument("shards", nargs="+", help="shards: patterns, directories or s3:// prefixes")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=8, help="samples shown")
    p.add_argument("--p-hr", type=float, default=0.5, help="share drawn from the high-res stream")
    p.add_argument("--index", help="index directory (default: beside the shards)")
    p.add_argument("--seed", type=int, default=0, help="loader seed")
    p.add_argument("--patch-size", type=int, default=256, help="GT crop and encoder input size P")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user mistake prints `infd <cmd>: error: <message>` and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError) as err:
        print(f"{args.prog}: error: {err}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The `infd` console script: main() as its process's whole life (infd/utils/process_main.py)."""
    return run_as_process(main)
