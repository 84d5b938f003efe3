"""Evaluate super-resolution: held-out images downscaled by each factor, upsampled back by each method,
compared with the originals (PSNR, LPIPS, FID) and with the input (lr_rmse: the output downscaled back to the
input's size against the input, RMSE in [-1, 1] units: how faithful to what it was given).

The original of image i is its centre square resized to `size` (real_square, the FID rule); its input at
scale s is that square resized to size/s with infd.image.resize_antialiased (8-bit, as a saved file). An
`Upsample` maps inputs (B, 3, h, w) in [-1, 1], the output size (H, W) and one seed per image to outputs
(B, 3, H, W); each is quantised to 8 bits (what a saved result holds) before it is measured.

Rank r takes batches r, r + W, ... (batches_of_rank: a batch holds the same images at any W, so its floats
match bit for bit); per-image sums and feature moments are all-reduced once. Collective: every rank calls
`evaluate_superres`; rank 0 gets the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infd.config import ConfigError
from infd.eval.features import FeatureConfig, metric_suffix, to_uint8
from infd.eval.frechet import FeatureMoments, frechet_distance
from infd.eval.pfid import real_square
from infd.eval.real_set import batches_of_rank, read_or_skip
from infd.metrics import psnr

METHODS = ("bicubic", "ae", "diffusion", "diffusion_nocond", "guided")
Upsample = Callable[[Tensor, tuple[int, int], list[int]], Tensor]


@dataclass
class SREvalConfig:
    size: int = 256  # side of the originals (centre squares); images with a shorter side are skipped
    scales: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    num_images: int = 100
    seed: int = 0  # image i is sampled with seed + i (every scale and method)
    batch_size: int = 4  # images upsampled at once per rank
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def validate(self, prefix: str = "") -> None:
        if self.num_images < 1 or self.batch_size < 1:
            raise ConfigError(f"config keys '{prefix}num_images' = {self.num_images} and '{prefix}batch_size' = "
                              f"{self.batch_size}: both must be at least 1")
        bad = [s for s in self.scales if not 1 <= s <= self.size]
        if not self.scales or bad or len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"config key '{prefix}scales' = {self.scales}: give distinct factors in [1, size = "
                              f"{self.size}]")
        self.features.validate(prefix + "features.")


def lowres_of(images: Tensor, scale: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, round(H/s), round(W/s)) by the project's resampling rule, through 8 bits."""
    from infd.image import pil_to_tensor, resize_antialiased, tensor_to_pil

    h, w = (max(1, round(n / scale)) for n in images.shape[-2:])
    return torch.stack([pil_to_tensor(resize_antialiased(tensor_to_pil(x), (h, w))) for x in images.cpu()])


def quantised(images: Tensor) -> Tensor:
    """[-1, 1] -> the values an 8-bit file holds (infd.eval.features.to_uint8), back in [-1, 1]."""
    return to_uint8(images).float().div(127.5).sub(1)


def bicubic(lowres: Tensor, size: tuple[int, int], seeds: list[int]) -> Tensor:
    return F.interpolate(lowres, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


@dataclass
class FieldUpsample:
    """Through the autoencoder: the input encoded (at the encoder's input size) and rendered at the output
    size; with `resolver` (infd.diffusion.superres.SuperResolver) the rendered latent is sampled conditioned
    on the input's latent (zero_condition: on zeros)."""

    ae: nn.Module
    options: object = None  # infd.render.RenderOptions
    resolver: object = None
    zero_condition: bool = False

    @torch.no_grad()
    def __call__(self, lowres: Tensor, size: tuple[int, int], seeds: list[int]) -> Tensor:
        from infd.diffusion.superres import encode_images
        from infd.render import render_tiles

        dev = next(self.ae.parameters()).device
        z = encode_images(self.ae, list(lowres), dev)
        if self.resolver is not None:
            z = self.resolver.latents(z, seeds, self.zero_condition)
        return render_tiles(self.ae.renderer, self.ae.decode(z), size, options=self.options).cpu()


@dataclass
class GuidedUpsample:
    """Zero-shot: a plain UNet sampled by diffusion posterior sampling (infd/solve/) towards a latent whose
    render of the whole canvas at the input's size matches the input (L2)."""

    model: object  # infd.diffusion.generate.LatentDiffusion
    ae: nn.Module
    spec: object  # infd.diffusion.spec.SamplingSpec (ddim or ddpm; guide_scale, guide_grad)
    latent: int
    options: object = None

    def __call__(self, lowres: Tensor, size: tuple[int, int], seeds: list[int]) -> Tensor:
        from infd.diffusion.generate import generate_latents
        from infd.diffusion.spec import Conditioning
        from infd.render import render_tiles
        from infd.solve.conditions import ImageCondition, RegionGuide

        dev, out = self.model.device, []
        for image, seed in zip(lowres, seeds):  # one reference per guide
            guide = RegionGuide(self.ae, size, [ImageCondition((0, 0, *size), image.to(dev))])
            shape = (1, self.model.unet.cfg.in_channels, self.latent, self.latent)
            z = generate_latents(self.model, self.spec, Conditioning(guide=guide), shape, [seed])
            with torch.no_grad():
                out.append(render_tiles(self.ae.renderer, self.ae.decode(z), size, options=self.options).cpu())
        return torch.cat(out)


@dataclass
class SRResult:
    """metrics: the JSON object (rank 0); examples: {(method, scale): (3, H, W)} of the set's first image,
    and {("input", scale): its input, ("original", 0): the original} (rank 0 holds them if it had image 0)."""

    metrics: dict
    examples: dict


def _sums(upsamplers: dict, cfg: SREvalConfig) -> Tensor:
    return torch.zeros(len(upsamplers), len(cfg.scales), 4, dtype=torch.float64)  # psnr, lpips, lr sq. err, count


def evaluate_superres(images, upsamplers: dict[str, Upsample], cfg: SREvalConfig, extractor, lpips_net, device,
                      rank: int = 0, world: int = 1, progress: bool = True) -> SRResult:
    """images: a RealSet or FolderSet (ids, read(position)); extractor: FID features (infd.eval.features);
    lpips_net: an LPIPS module or None; both on `device`."""
    from tqdm import tqdm

    from infd.eval.generative import all_reduce_sum, sum_counts

    cfg.validate()
    sums, skips, examples = _sums(upsamplers, cfg), {}, {}
    moments = {key: FeatureMoments(extractor.num_features) for key in [*_pairs(upsamplers, cfg), ("original", 0)]}
    batches = batches_of_rank(len(images.ids), cfg.batch_size, rank, world)
    bar = tqdm(total=sum(map(len, batches)), desc="eval-sr", unit="img", disable=not progress or rank != 0)
    for positions in batches:
        kept = [(p, sq) for p in positions if (sq := _original(images, p, cfg.size, skips)) is not None]
        bar.update(len(positions))
        if not kept:
            continue
        originals = torch.stack([sq for _, sq in kept])
        moments[("original", 0)].add(extractor(originals.to(device)).cpu())
        if kept[0][0] == 0:
            examples[("original", 0)] = originals[0]
        seeds = [cfg.seed + p for p, _ in kept]
        for j, scale in enumerate(cfg.scales):
            lowres = lowres_of(originals, scale)
            if kept[0][0] == 0:
                examples[("input", scale)] = lowres[0]
            for i, (name, upsample) in enumerate(upsamplers.items()):
                out = quantised(upsample(lowres, tuple(originals.shape[-2:]), seeds))
                sums[i, j] += _measure(out, originals, lowres, scale, lpips_net, device)
                moments[(name, scale)].add(extractor(out.to(device)).cpu())
                if kept[0][0] == 0:
                    examples[(name, scale)] = out[0]
    bar.close()
    sums = all_reduce_sum(sums, device)
    for m in moments.values():
        m.all_reduce(device)
    skips = sum_counts(skips)
    if not moments[("original", 0)].count:
        raise ConfigError(f"no held-out image could be used ({skips}): each needs a short side >= {cfg.size} "
                          "(lower --size) and to be readable")
    return SRResult(_metrics(sums, moments, upsamplers, cfg, lpips_net, skips) if rank == 0 else {}, examples)


def _pairs(upsamplers: dict, cfg: SREvalConfig) -> list[tuple[str, int]]:
    return [(name, s) for name in upsamplers for s in cfg.scales]


def _original(images, position: int, size: int, skips: dict) -> Tensor | None:
    img = read_or_skip(images, position, skips)
    if img is None:
        return None
    square = real_square(img, size)
    if square is None:
        skips["smaller_than_size"] = skips.get("smaller_than_size", 0) + 1
    return square


def _measure(out: Tensor, originals: Tensor, lowres: Tensor, scale: int, lpips_net, device) -> Tensor:
    """[sum of PSNR, sum of LPIPS, sum of the per-image mean squared error to the input, count]."""
    row = torch.zeros(4, dtype=torch.float64)
    row[0] = psnr(out, originals).double().sum()
    if lpips_net is not None:
        with torch.no_grad():
            row[1] = lpips_net(out.to(device), originals.to(device)).double().sum().cpu()
    row[2] = (lowres_of(out, scale) - lowres).pow(2).flatten(1).mean(1).double().sum()
    row[3] = len(out)
    return row


def _metrics(sums: Tensor, moments: dict, upsamplers: dict, cfg: SREvalConfig, lpips_net, skips: dict) -> dict:
    suffix = metric_suffix(cfg.features)
    lpips_name = "lpips_randinit" if getattr(lpips_net, "is_random_init", False) else "lpips"
    real = moments[("original", 0)]
    table: dict = {}
    for i, name in enumerate(upsamplers):
        table[name] = {}
        for j, scale in enumerate(cfg.scales):
            psnr_sum, lpips_sum, lr_sq, n = sums[i, j].tolist()
            row = {"psnr": psnr_sum / max(n, 1), "lr_rmse": (lr_sq / max(n, 1)) ** 0.5}
            if lpips_net is not None:
                row[lpips_name] = lpips_sum / max(n, 1)
            gen = moments[(name, scale)]
            row["fid" + suffix] = frechet_distance(*gen.stats(), *real.stats()) if gen.count >= 2 else None
            table[name][f"x{scale}"] = row
    return {"num_images": int(real.count), "size": cfg.size, "scales": list(cfg.scales), "seed": cfg.seed,
            "skipped": skips, "methods": table}
