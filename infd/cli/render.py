"""`infd upsample` and `infd eval-ae`: an autoencoder export applied to images."""
from __future__ import annotations

import json

from infd.cli.common import (check_image_out, device, open_export, parse_region, parse_size, read_image,
                             render_options)
from infd.config import ConfigError


def cmd_upsample(args) -> int:
    import time

    import torch

    from infd.image import pil_to_tensor, resize_antialiased, save_image
    from infd.render import render_tiles

    options = render_options(args)
    if args.scale is not None and not args.scale > 0:
        raise ConfigError(f"--scale {args.scale}: expected a positive factor")
    check_image_out(args.out)
    img = read_image(args.image)  # upright: EXIF orientation applied, like the loader
    if args.size:
        size = parse_size(args.size)
    else:
        size = (round(img.height * args.scale), round(img.width * args.scale))
        if min(size) < 1:
            raise ConfigError(f"--scale {args.scale}: the {img.width}x{img.height} image would be "
                              f"{size[1]}x{size[0]} pixels")
    region = parse_region(args.region, size)
    dev = device(args.device)
    model, _ = open_export(args.ckpt, "autoencoder", "--ckpt", dev)
    # The field covers the whole image in [-1, 1]^2 whatever its aspect: encode a square resize at
    # the model's input size, render at the requested (H, W).
    enc = model.cfg.net.resolution
    x = pil_to_tensor(resize_antialiased(img, (enc, enc)))[None].to(dev)
    start = time.perf_counter()
    with torch.no_grad():
        phi = model.decode(model.encode(x))
        out = render_tiles(model.renderer, phi, size, region=region, options=options, progress=True)
    path = save_image(out, args.out)
    print(f"{args.image} ({img.width}x{img.height}) -> {path} ({out.shape[-1]}x{out.shape[-2]}) in "
          f"{time.perf_counter() - start:.1f} s on {dev}")
    return 0


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
