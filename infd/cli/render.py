"""`infd upsample` and `infd eval-ae`: an autoencoder export applied to images."""
from __future__ import annotations

import json
from pathlib import Path

from infd.cli.common import (check_image_out, device, open_export, parse_region, parse_size, read_image,
                             render_options)
from infd.config import ConfigError


def cmd_upsample(args) -> int:
    """An image (or a folder of them) rendered at any scale: through the autoencoder alone, or with --unet a
    super-resolution UNet samples the latent conditioned on the input (--num-images plausible results)."""
    import time

    import torch

    from infd.diffusion.superres import encode_images
    from infd.image import save_image
    from infd.render import render_tiles

    options = render_options(args)
    if args.scale is not None and not args.scale > 0:
        raise ConfigError(f"--scale {args.scale}: expected a positive factor")
    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images}: expected at least 1")
    inputs = _input_images(args.image)
    many = len(inputs) > 1 or Path(args.image).is_dir() or args.num_images > 1
    if many and Path(args.out).suffix:
        raise ConfigError(f"--out {args.out}: a folder of inputs or --num-images > 1 writes a folder of images; "
                          "give a folder path")
    if not many:
        check_image_out(args.out)
    dev = device(args.device)
    model, _ = open_export(args.ckpt, "autoencoder", "--ckpt", dev)
    sr = None
    if args.unet:
        sr, line = superres_resolver(args, model, f"--ckpt {args.ckpt}", dev)
        print(line, flush=True)
    skipped = 0
    for path in inputs:
        try:
            img = read_image(str(path))  # upright: EXIF orientation applied, like the loader
        except ConfigError as err:
            if len(inputs) == 1:
                raise
            skipped += 1  # one unreadable file of a folder does not stop the others
            print(f"skipped {err}", flush=True)
            continue
        size = _output_size(args, img)
        region = parse_region(args.region, size)
        # The field covers the whole image in [-1, 1]^2 whatever its aspect: encode a square resize at
        # the model's input size, render at the requested (H, W).
        start = time.perf_counter()
        z = encode_images(model, [img], dev)
        latents = [z] if sr is None else [sr.latents(z, [args.seed + k], progress=True) for k in range(args.num_images)]
        for k, z in enumerate(latents):
            with torch.no_grad():
                out = render_tiles(model.renderer, model.decode(z), size, region=region, options=options,
                                   progress=True)
            where = Path(args.out) / (f"{path.stem}_{k}.png" if args.num_images > 1 else f"{path.stem}.png")
            saved = save_image(out, where if many else args.out)
            print(f"{path} ({img.width}x{img.height}) -> {saved} ({out.shape[-1]}x{out.shape[-2]}"
                  f"{f', seed {args.seed + k}' if sr is not None else ''}) in {time.perf_counter() - start:.1f} s "
                  f"on {dev}", flush=True)
    if skipped:
        print(f"{skipped} of {len(inputs)} inputs skipped (unreadable)", flush=True)
    return 0


def _input_images(spec: str) -> list[Path]:
    """The input: one image, or the images of a folder (sorted)."""
    from infd.data.decode import image_files

    return image_files(spec) if Path(spec).is_dir() else [Path(spec)]


def _output_size(args, img) -> tuple[int, int]:
    if args.size:
        return parse_size(args.size)
    size = (round(img.height * args.scale), round(img.width * args.scale))
    if min(size) < 1:
        raise ConfigError(f"--scale {args.scale}: the {img.width}x{img.height} image would be {size[1]}x{size[0]} "
                          "pixels")
    return size


def superres_resolver(args, ae, ae_what: str, dev):
    """The SuperResolver of the --unet super-resolution UNet, checked against the autoencoder `ae` (named
    `ae_what` in errors), with the sampling flags over the export's recorded options; and a line saying so."""
    from infd.cli.sample import check_sampling, latent_diffusion, load_unet, resolve_sampling
    from infd.diffusion.superres import SuperResolver

    unet, record = load_unet(args.unet, dev)
    if not unet.cfg.lowres_channels:
        raise ConfigError(f"--unet {args.unet} is not a super-resolution UNet (its lowres_channels is 0): train one "
                          "with experiment=sr_cpu_tiny, or leave out --unet for the autoencoder alone")
    if unet.cfg.lowres_channels != ae.cfg.bottleneck.embed_dim:
        raise ConfigError(f"--unet {args.unet} takes a {unet.cfg.lowres_channels}-channel condition, the autoencoder "
                          f"{ae_what} has {ae.cfg.bottleneck.embed_dim}-channel latents: use the autoencoder "
                          "the UNet was trained with")
    spec, source = resolve_sampling(args, record.sampling, record.schedule().objective == "rectified_flow")
    check_sampling(spec, record.schedule())
    line = f"super-resolution UNet {args.unet}: sampler {spec.sampler}, {spec.steps} steps ({source})"
    return SuperResolver(latent_diffusion(unet, record, dev), spec), line


def cmd_eval_ae(args) -> int:
    from infd.eval.reconstruction import evaluate_autoencoder, iterate_images
    from infd.losses import build_lpips

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: expected at least 1")
    if any(s < 1 for s in args.scales):
        raise ConfigError(f"--scales {args.scales}: expected factors of at least 1")
    dev = device(args.device)
    model, _ = open_export(args.ckpt, "autoencoder", "--ckpt", dev)
    lpips_net = None
    if args.lpips != "none":
        lpips_net = build_lpips(args.lpips).to(dev)
    result = evaluate_autoencoder(model, iterate_images(args.data, args.limit), dev,
                                  scales=tuple(args.scales), base=model.cfg.net.resolution, lpips_net=lpips_net)
    if lpips_net is not None and lpips_net.is_random_init and "lpips_1x" in result:
        result["lpips_1x_randinit"] = result.pop("lpips_1x")  # not a perceptual metric: say so
    print(json.dumps(result))
    return 0
