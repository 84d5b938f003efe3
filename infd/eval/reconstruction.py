"""Autoencoder evaluation: reconstruction PSNR at several render scales, LPIPS, scale consistency.

Each image's centre square is encoded from its resize to the model's input size `base` (256 in
the paper); the field is rendered at base * s for s in `scales` and compared with the square
downsampled (antialiased) to that size,
when the original is large enough (otherwise that scale is skipped for the image and counted).
Scale consistency: render at 2r, downsample to r, compare with the render at r.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from PIL import Image

from infd.data.tar_samples import image_bytes
from infd.data.decode import SkipSample, decode_rgb, open_image
from infd.data.tar_samples import TruncatedShard, iterate_tar
from infd.data.urls import expand_urls, open_stream
from infd.image import pil_to_tensor, resize_antialiased
from infd.metrics import downsample_area, psnr
from infd.render import render_tiles


def centre_square(img: Image.Image) -> Image.Image:
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def iterate_images(shards, limit: int | None = None):
    """Decoded RGB images (centre squares) from shards, in order; bad ones are skipped."""
    count = 0
    for url in expand_urls(shards):
        stream = open_stream(url)
        try:
            for raw in iterate_tar(stream):
                try:
                    yield raw["__key__"], centre_square(decode_rgb(open_image(image_bytes(raw))))
                except SkipSample:
                    continue
                count += 1
                if limit is not None and count >= limit:
                    return
        except TruncatedShard:
            continue
        finally:
            stream.close()


def metric_keys(scales=(1, 2, 4), lpips: bool = True) -> list[str]:
    """The sums `reconstruction_sums` fills for these scales (fixed order: ranks add them up)."""
    keys = [f"psnr_{s}x" for s in scales] + (["lpips_1x"] if lpips and 1 in scales else [])
    return keys + [f"scale_consistency_psnr_{s}x" for s in scales if 2 * s in scales]


@torch.no_grad()
def reconstruction_sums(model, images, device, scales=(1, 2, 4), base: int = 256, lpips_net=None,
                        progress: bool = True) -> tuple[dict, dict]:
    """(sums, counts) of the per-image metrics over `images` (an iterable of (key, PIL square));
    counts also holds `skipped_<s>x_too_small`. Sums from several ranks add up to the whole set's."""
    sums, counts = defaultdict(float), defaultdict(int)
    items = images
    if progress:
        from tqdm import tqdm

        items = tqdm(images, desc="eval-ae", unit="img")
    for _, square in items:
        x = pil_to_tensor(resize_antialiased(square, (base, base)))[None].to(device)
        phi = model.decode(model.encode(x))
        renders = {}
        for s in scales:
            size = base * s
            renders[s] = render_tiles(model.renderer, phi, (size, size))
            if square.width < size:
                counts[f"skipped_{s}x_too_small"] += 1
                continue
            gt = pil_to_tensor(resize_antialiased(square, (size, size)))[None]
            sums[f"psnr_{s}x"] += psnr(renders[s], gt).item()
            counts[f"psnr_{s}x"] += 1
            if s == 1 and lpips_net is not None:
                sums["lpips_1x"] += lpips_net(renders[s].to(device).clamp(-1, 1), gt.to(device)).mean().item()
                counts["lpips_1x"] += 1
        for s in scales:
            if 2 * s in renders:
                down = downsample_area(renders[2 * s], (base * s, base * s))
                sums[f"scale_consistency_psnr_{s}x"] += psnr(down, renders[s]).item()
                counts[f"scale_consistency_psnr_{s}x"] += 1
    return sums, counts


def evaluate_autoencoder(model, images, device, scales=(1, 2, 4), base: int = 256, lpips_net=None,
                         progress: bool = True) -> dict:
    """Mean metrics over `images` (an iterable of (key, PIL square)). Returns a flat dict."""
    sums, counts = reconstruction_sums(model, images, device, scales, base, lpips_net, progress)
    out = {k: sums[k] / counts[k] for k in sums}
    out.update({k: v for k, v in counts.items() if k.startswith("skipped")})
    out["images"] = max([counts[f"psnr_{scales[0]}x"]] + [0])
    return out
