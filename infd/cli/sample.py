"""`infd sample`: images from a trained UNet, rendered by its autoencoder at any size or region.

Image k (prompts in order, --num-images per prompt) has seed --seed + k and its own noise
generator, so it is the same whatever --batch-size. --out ending in an image suffix is one file
(a grid when there is more than one image); any other path is a folder of 0000.png, 0001.png...
"""
from __future__ import annotations

import math
from pathlib import Path

from infd.cli_common import device, load_export, parse_region, parse_size, read_lines
from infd.config import ConfigError

# `infd sample` without --sampler/--steps/--eta/--spacing and without recorded defaults in the export.
SAMPLING_DEFAULTS = {"sampler": "ddim", "steps": 50, "eta": 0.0, "spacing": "linspace"}
FLOW_SAMPLER = "euler"  # the built-in default sampler of a rectified-flow UNet
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def resolve_sampling(args, recorded: dict, flow: bool = False) -> tuple[dict, str]:
    """The sampling options {"sampler", "steps", "eta", "spacing"} and where the unset ones came
    from. The export's recorded options (`extra["sampling"]`) are one bundle: they fill in unset
    flags unless --sampler picks another sampler (an eta or spacing recorded for ddim would not fit
    dpmpp), in which case the built-in defaults do (sampler euler for a rectified-flow UNet)."""
    defaults = {**SAMPLING_DEFAULTS, "sampler": FLOW_SAMPLER} if flow else SAMPLING_DEFAULTS
    recorded = {**defaults, **recorded} if recorded else {}
    base, source = defaults, "built-in defaults"
    if recorded and args.sampler in (None, recorded["sampler"]):
        base, source = recorded, "the UNet export's defaults"
    given = {k: getattr(args, k) for k in SAMPLING_DEFAULTS}
    return {k: base[k] if given[k] is None else given[k] for k in SAMPLING_DEFAULTS}, source


def check_sampling(options: dict, diffusion_cfg) -> None:
    """ConfigError (exit 2, no traceback) for a sampler that does not fit the UNet's objective,
    options the sampler does not take, a bad spacing or step count: checked before sampling."""
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


def autoencoder_path(args, extra: dict) -> tuple[str, str]:
    """(export path, how it was chosen): --ae, else the autoencoder the UNet export records."""
    if args.ae:
        return args.ae, "--ae"
    recorded = extra.get("autoencoder")
    if not recorded:
        raise ConfigError(f"--unet {args.unet} records no autoencoder (it was trained on a latent cache "
                          "or exported before autoencoders were recorded): pass --ae AE_EXPORT")
    if not Path(recorded).is_dir():
        raise ConfigError(f"--unet {args.unet} records autoencoder {recorded}, which is not a directory here "
                          "(a relative path is read from the current directory): pass --ae AE_EXPORT")
    return recorded, "the autoencoder recorded in the UNet export"


def load_unet(path: str, dev):
    """A UNet export, or a Stable Diffusion folder in the diffusers layout used as it is: its
    UNet, with its text encoder, schedule, timestep spacing and latent scale as the export's
    metadata would record them (sample with the autoencoder converted from its VAE: --ae)."""
    if not (Path(path) / "unet" / "config.json").is_file():
        return load_export(path, "unet", "--unet", dev)
    from infd.convert.stable_diffusion import read_sd_settings
    from infd.models.unet import UNetConfig, build_unet

    settings = read_sd_settings(path)
    unet = build_unet(UNetConfig(kind="diffusers", pretrained=path), load_pretrained=True).to(dev).eval()
    unet.export_extra = {"latent_scale": settings["diffusion"]["latent_scale"], "diffusion": settings["diffusion"],
                         "text": {"kind": "hf_clip", "pretrained": path},
                         "sampling": {**SAMPLING_DEFAULTS, "spacing": settings["spacing"]}}
    return unet


def latent_size(args, unet, ae) -> int:
    """--latent-size, else the size a pretrained diffusers UNet was trained at (its sample_size:
    64 for SD 1.x, whose 512 px images are 64x64 latents), else the autoencoder's latent at its
    input size. The render size (--size) is independent of it: that is the point of the field."""
    if args.latent_size is not None:
        if args.latent_size < 1:
            raise ConfigError(f"--latent-size {args.latent_size}: expected at least 1")
        return args.latent_size
    trained = unet.cfg.diffusers_config.get("sample_size") if unet.cfg.kind == "diffusers" else None
    if isinstance(trained, int):
        return trained
    return ae.cfg.net.resolution // ae.cfg.net.downsample_factor


def output_is_folder(out: str) -> bool:
    return out.endswith(("/", "\\")) or Path(out).suffix.lower() not in IMAGE_SUFFIXES


def grid_cols(n: int) -> int:
    return math.ceil(math.sqrt(n))


def grid(images: list):
    """(3, H, W) tensors in [-1, 1] -> one (3, H', W') grid, grid_cols per row, 2 white pixels between cells."""
    import torch
    from torchvision.utils import make_grid

    return make_grid(torch.stack(images), nrow=grid_cols(len(images)), padding=2, pad_value=1.0)


def cmd_sample(args) -> int:
    import torch

    from infd.config import from_mapping
    from infd.diffusion.schedule import DiffusionConfig
    from infd.image import save_image
    from infd.render import render_tiles
    from infd.sampling import generate_latents
    from infd.text import TextEncoderConfig, build_text_encoder

    # User mistakes first, before any model loads.
    size = parse_size(args.size)
    region = parse_region(args.region, size)
    if args.num_images < 1 or args.batch_size < 1:
        raise ConfigError(f"--num-images {args.num_images} --batch-size {args.batch_size}: both must be at least 1")
    prompts = read_lines(args.prompts, "--prompts") if args.prompts else [args.prompt or ""]
    dev = device(args.device)
    unet = load_unet(args.unet, dev)
    extra = unet.export_extra
    if args.label is not None and not 0 <= args.label < unet.cfg.num_classes:
        raise ConfigError(f"--label {args.label}: " + (f"expected a class in [0, {unet.cfg.num_classes})"
                          if unet.cfg.num_classes else "needs a class-conditional UNet (its num_classes is 0)"))
    diffusion_cfg = from_mapping(DiffusionConfig, extra.get("diffusion", {}))
    options, source = resolve_sampling(args, extra.get("sampling", {}), diffusion_cfg.objective == "rectified_flow")
    check_sampling(options, diffusion_cfg)
    ae_path, ae_source = autoencoder_path(args, extra)
    ae = load_export(ae_path, "autoencoder", "--ae" if args.ae else "the UNet export's autoencoder", dev)
    print(f"autoencoder {ae_path} ({ae_source})", flush=True)
    print(f"sampler {options['sampler']}, {options['steps']} steps, eta {options['eta']}, spacing "
          f"{options['spacing']} (unset options: {source})", flush=True)
    text = build_text_encoder(from_mapping(TextEncoderConfig, extra.get("text", {})))
    text = text.to(dev) if text is not None else None
    latent = latent_size(args, unet, ae)
    # Image k: prompt k // num_images, seed args.seed + k.
    jobs = [(prompt, args.seed + i * args.num_images + j) for i, prompt in enumerate(prompts)
            for j in range(args.num_images)]
    folder = output_is_folder(args.out)
    out, kept = Path(args.out), []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        labels = torch.full((len(batch),), args.label, device=dev) if args.label is not None else None
        z = generate_latents(unet, diffusion_cfg, extra["latent_scale"], (len(batch), unet.cfg.in_channels, latent,
                             latent), [p for p, _ in batch] if text is not None else None, text, args.cfg,
                             options["sampler"], options["steps"], seed=[s for _, s in batch], device=dev,
                             progress=True, labels=labels, eta=options["eta"], spacing=options["spacing"])
        with torch.no_grad():
            images = render_tiles(ae.renderer, ae.decode(z), size, region=region, tile=args.tile, progress=True)
        for k, ((prompt, seed), image) in enumerate(zip(batch, images), start):
            where = out / f"{k:04d}.png" if folder else out
            if folder or len(jobs) == 1:
                save_image(image, where)
            else:
                kept.append(image)
            print(f"{prompt!r} -> {where}{'' if folder or len(jobs) == 1 else f' (cell {k})'} "
                  f"({image.shape[-1]}x{image.shape[-2]}, seed {seed})", flush=True)
    if kept:
        path = save_image(grid(kept), out)
        print(f"{len(kept)} images -> {path} (grid, {grid_cols(len(kept))} per row)", flush=True)
    return 0

