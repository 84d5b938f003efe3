"""`infd sample`: images from a trained UNet, rendered by its autoencoder at any size or region.

Image k (prompts in order, --num-images per prompt) has seed --seed + k and its own noise
generator, so it is the same whatever --batch-size. --out ending in an image suffix is one file
(a grid when there is more than one image); any other path is a folder of 0000.png, 0001.png...
"""
from __future__ import annotations

import math
from pathlib import Path

from infd.cli.common import device, open_export, parse_region, parse_size, read_lines, render_options
from infd.config import ConfigError


def add_sampling_flags(p) -> None:
    """The sampling flags of `infd sample` and `infd eval-gen`, one per SamplingSpec field. They
    default to None: unset ones come from the UNet export (resolve_sampling), else the spec's defaults."""
    from infd.diffusion.samplers import SAMPLERS, SPACINGS
    from infd.diffusion.spec import FLOW_SAMPLERS, SamplingSpec

    d = SamplingSpec()
    recorded = "default: the UNet export's recorded choice, else"
    p.add_argument("--sampler", choices=list(SAMPLERS), help="ddpm, ddim, dpmpp for epsilon/v objectives; euler, "
                   f"heun for rectified flow ({recorded} {d.sampler}, or {FLOW_SAMPLERS[0]} for rectified flow)")
    p.add_argument("--steps", type=int, help=f"sampling steps ({recorded} {d.steps})")
    p.add_argument("--eta", type=float, help=f"DDIM noise, 0 deterministic .. 1 ancestral; ddim only ({recorded} "
                   f"{d.eta})")
    p.add_argument("--spacing", choices=list(SPACINGS), help="timesteps of ddim/ddpm: leading is the official "
                   f"LDM/INFD stride ({recorded} {d.spacing})")
    p.add_argument("--cfg", dest="cfg_scale", type=float, help="classifier-free guidance scale, 1: no guidance "
                   f"({recorded} {d.cfg_scale})")


def resolve_sampling(args, recorded, flow: bool = False):
    """(SamplingSpec, where the unset options came from). The export's recorded spec fills in
    unset flags, its sampler options (SAMPLER_BUNDLE) as one bundle: not when --sampler picks
    another sampler (an eta or spacing recorded for ddim would not fit dpmpp); then the built-in
    defaults do (sampler euler for a rectified-flow UNet). The guidance scale is not the sampler's:
    unset, it is the recorded one whatever the sampler."""
    from dataclasses import fields, replace

    from infd.diffusion.spec import default_spec

    defaults = default_spec(flow)
    base, source = defaults, "built-in defaults"
    if recorded is not None and args.sampler in (None, recorded.sampler):
        base, source = recorded, "the UNet export's defaults"
    elif recorded is not None:
        base = replace(defaults, cfg_scale=recorded.cfg_scale)
    given = {f.name: getattr(args, f.name, None) for f in fields(base)}
    return replace(base, **{k: v for k, v in given.items() if v is not None}), source


def check_sampling(spec, diffusion_cfg) -> None:
    """ConfigError (exit 2, no traceback) for a sampler that does not fit the UNet's objective,
    options the sampler does not take, a bad spacing or step count: checked before sampling."""
    from infd.diffusion.schedule import build_schedule

    try:
        spec.check(build_schedule(diffusion_cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def autoencoder_path(args, record) -> tuple[str, str]:
    """(export path, how it was chosen): --ae, else the autoencoder the UNet export records."""
    if args.ae:
        return args.ae, "--ae"
    if not record.autoencoder:
        raise ConfigError(f"--unet {args.unet} records no autoencoder (it was trained on a latent cache "
                          "or exported before autoencoders were recorded): pass --ae AE_EXPORT")
    if not Path(record.autoencoder).is_dir():
        raise ConfigError(f"--unet {args.unet} records autoencoder {record.autoencoder}, which is not a directory "
                          "here (a relative path is read from the current directory): pass --ae AE_EXPORT")
    return record.autoencoder, "the autoencoder recorded in the UNet export"


def load_unet(path: str, dev):
    """(UNet, ExportRecord) of a UNet export, or of a Stable Diffusion folder in the diffusers layout
    used as it is: its UNet, with a record of its text encoder, schedule, timestep spacing and latent
    scale (sample with the autoencoder converted from its VAE: --ae)."""
    if not (Path(path) / "unet" / "config.json").is_file():
        return open_export(path, "unet", "--unet", dev)
    from infd.models import build_unet

    record = sd_record(path)
    return build_unet(record.model, load_pretrained=True).to(dev).eval(), record


def sd_record(path: str):
    """The ExportRecord a UNet export of Stable Diffusion folder `path` would hold."""
    from infd.config import from_mapping
    from infd.convert.stable_diffusion import read_sd_settings
    from infd.diffusion.schedule import DiffusionConfig
    from infd.diffusion.spec import SamplingSpec
    from infd.export import ExportRecord
    from infd.models.unet import UNetConfig
    from infd.text import TextEncoderConfig

    settings = read_sd_settings(path)
    return ExportRecord(kind="unet", model=UNetConfig(kind="diffusers", pretrained=path),
                        diffusion=from_mapping(DiffusionConfig, settings["diffusion"]),
                        text=TextEncoderConfig(kind="hf_clip", pretrained=path),
                        sampling=SamplingSpec(spacing=settings["spacing"]))


def open_ae(args, record, dev):
    """(autoencoder, its path): --ae, else the one the UNet export records."""
    path, source = autoencoder_path(args, record)
    ae, _ = open_export(path, "autoencoder", "--ae" if args.ae else "the UNet export's autoencoder", dev)
    return ae, path, source


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
    from infd.data.decode import IMAGE_SUFFIXES

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

    from infd.diffusion.generate import generate_latents
    from infd.diffusion.spec import Conditioning
    from infd.image import save_image
    from infd.render import render_tiles

    # User mistakes first, before any model loads.
    size = parse_size(args.size)
    region = parse_region(args.region, size)
    if args.num_images < 1 or args.batch_size < 1:
        raise ConfigError(f"--num-images {args.num_images} --batch-size {args.batch_size}: both must be at least 1")
    prompts = read_lines(args.prompts, "--prompts") if args.prompts else [args.prompt or ""]
    dev = device(args.device)
    unet, record = load_unet(args.unet, dev)
    if unet.cfg.lowres_channels:
        raise ConfigError(f"--unet {args.unet} is a super-resolution UNet (conditioned on a low-resolution image): "
                          "use infd upsample IMAGE --unet ... --ckpt AE")
    if args.label is not None and not 0 <= args.label < unet.cfg.num_classes:
        raise ConfigError(f"--label {args.label}: " + (f"expected a class in [0, {unet.cfg.num_classes})"
                          if unet.cfg.num_classes else "needs a class-conditional UNet (its num_classes is 0)"))
    spec, source = resolve_sampling(args, record.sampling, record.schedule().objective == "rectified_flow")
    check_sampling(spec, record.schedule())
    ae, ae_path, ae_source = open_ae(args, record, dev)
    print(f"autoencoder {ae_path} ({ae_source})", flush=True)
    print(f"sampler {spec.sampler}, {spec.steps} steps, eta {spec.eta}, spacing {spec.spacing} (unset options: "
          f"{source}); guidance scale {spec.cfg_scale}", flush=True)
    model = latent_diffusion(unet, record, dev)
    latent = latent_size(args, unet, ae)
    # Image k: prompt k // num_images, seed args.seed + k.
    jobs = [(prompt, args.seed + i * args.num_images + j) for i, prompt in enumerate(prompts)
            for j in range(args.num_images)]
    folder = output_is_folder(args.out)
    out, kept = Path(args.out), []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        labels = torch.full((len(batch),), args.label, device=dev) if args.label is not None else None
        cond = Conditioning([p for p, _ in batch] if model.text is not None else None, labels)
        z = generate_latents(model, spec, cond, (len(batch), unet.cfg.in_channels, latent, latent),
                             [s for _, s in batch], progress=True)
        with torch.no_grad():
            images = render_tiles(ae.renderer, ae.decode(z), size, region=region, options=render_options(args),
                                     progress=True)
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


def latent_diffusion(unet, record, dev):
    """The UNet with the schedule, latent scale and text encoder its record names."""
    from infd.diffusion.generate import LatentDiffusion
    from infd.text import build_text_encoder

    text = build_text_encoder(record.text) if record.text is not None else None
    return LatentDiffusion(unet, record.schedule(), text.to(dev) if text is not None else None)
