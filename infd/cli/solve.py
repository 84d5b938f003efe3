"""`infd solve SPEC`: sample an image under conditions on boxes of the canvas, each at its own scale
(infd/solve/, the paper's section 5.5), and write the solution at the canvas size, the layout over it and
each condition's residual measured on that output. The spec's format: infd/solve/spec.py, docs/solve.md.
"""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from infd.cli.common import device, parse_size, read_image, render_options
from infd.config import ConfigError


def add_parser(sub, command, device_help: str) -> None:
    from infd.cli.common import add_render_flags

    p = command(sub, "solve", "sample an image under conditions on boxes of the canvas at any scale (guided "
                "sampling through region renders)", cmd_solve)
    p.add_argument("spec", help="the solve spec, YAML or JSON (docs/solve.md)")
    p.add_argument("--unet", help="UNet export (default: the spec's unet)")
    p.add_argument("--ae", help="autoencoder export (default: the spec's ae, else the UNet export's)")
    p.add_argument("--out", help="output folder (default: the spec's out)")
    add_render_flags(p)
    p.add_argument("--device", help=device_help)


def cmd_solve(args) -> int:
    import torch

    from infd.cli.sample import check_sampling, latent_diffusion, latent_size, load_unet, open_ae
    from infd.diffusion.generate import generate_latents
    from infd.diffusion.spec import Conditioning
    from infd.image import save_image
    from infd.render import render_tiles
    from infd.solve.conditions import RegionGuide
    from infd.solve.spec import read_spec

    spec, base = read_spec(args.spec)
    spec.unet, spec.ae, spec.out = args.unet or spec.unet, args.ae or spec.ae, args.out or spec.out
    canvas = _size(spec.canvas, "canvas")  # (H, W)
    height, width = canvas
    conditions = _conditions(spec, canvas, base)  # user mistakes first, before any model loads
    dev = device(args.device)
    unet, record = load_unet(spec.unet, dev)
    check_sampling(spec.sampling, record.schedule())
    if spec.sampling.sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"config key 'sampling.sampler' = {spec.sampling.sampler!r}: guided sampling runs ddim "
                          "or ddpm steps")
    model = latent_diffusion(unet, record, dev)
    if spec.prompt and model.text is None:
        raise ConfigError(f"config key 'prompt' = {spec.prompt!r}: the UNet {spec.unet} has no text encoder")
    ae, ae_path, _ = open_ae(Namespace(ae=spec.ae, unet=spec.unet), record, dev)
    guide = RegionGuide(ae, canvas, [_on(c, dev) for c in conditions], _clip(spec, conditions, dev),
                        _lpips(spec, conditions, dev))
    latent = latent_size(Namespace(latent_size=spec.latent_size), unet, ae)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"autoencoder {ae_path}; {len(conditions)} conditions on a {width}x{height} canvas; sampler "
          f"{spec.sampling.sampler}, {spec.sampling.steps} steps, guide scale {spec.sampling.guide_scale} "
          f"(gradient: {spec.sampling.guide_grad})", flush=True)
    for seed in spec.seeds:
        cond = Conditioning([spec.prompt] if model.text is not None else None, None, guide)
        z = generate_latents(model, spec.sampling, cond, (1, unet.cfg.in_channels, latent, latent), [seed],
                             progress=True)
        with torch.no_grad():
            image = render_tiles(ae.renderer, ae.decode(z), canvas, options=render_options(args), progress=True)[0]
        save_image(image, out / f"solution_{seed}.png")
        _layout(image, conditions).save(out / f"layout_{seed}.png")
        line = {"seed": seed, "canvas": [width, height], "solution": str(out / f"solution_{seed}.png"),
                "residuals": [{"kind": _kind(c), "box": _xyxy(c.box), "residual": r}
                              for c, r in zip(conditions, guide.measured(image))]}
        with open(out / "residuals.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
    return 0


def _conditions(spec, canvas: tuple[int, int], base: Path) -> list:
    """The spec's conditions, typed, with their references read (relative paths: from the spec's folder)."""
    from infd.image import pil_to_tensor, resize_antialiased
    from infd.solve.conditions import ImageCondition, TextCondition
    from infd.solve.spec import box_of

    out = []
    for i, c in enumerate(spec.conditions):
        key = f"conditions[{i}]"
        box = box_of(c, canvas, key)
        if c.text is not None:
            out.append(TextCondition(box, c.text, c.weight))
            continue
        img = read_image(_path(c.image, base, f"{key}.image"))
        h, w = _size(c.size, f"{key}.size") if c.size else (img.height, img.width)
        reference = pil_to_tensor(resize_antialiased(img, (h, w)) if (w, h) != img.size else img)
        mask = None
        if c.mask is not None:
            m = read_image(_path(c.mask, base, f"{key}.mask")).convert("L")
            mask = pil_to_tensor(resize_antialiased(m.convert("RGB"), (h, w)))[0].add(1).div(2)
        out.append(ImageCondition(box, reference, mask, c.loss, c.weight))
    return out


def _on(cond, dev):
    """A condition with its reference and mask on the device."""
    from dataclasses import replace

    if not hasattr(cond, "reference"):
        return cond
    return replace(cond, reference=cond.reference.to(dev), mask=None if cond.mask is None else cond.mask.to(dev))


def _path(name: str, base: Path, key: str) -> str:
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.is_file():
        raise ConfigError(f"config key '{key}' = {name}: no such file ({path})")
    return str(path)


def _size(text: str, key: str) -> tuple[int, int]:
    """'WxH' of a spec key -> (H, W)."""
    try:
        return parse_size(text)
    except ConfigError as err:
        raise ConfigError(f"config key '{key}': {err}") from None


def _clip(spec, conditions, dev):
    from infd.eval.clip_score import ClipScorer
    from infd.solve.conditions import TextCondition

    if not any(isinstance(c, TextCondition) for c in conditions):
        return None
    scorer = ClipScorer(spec.clip, prefix="clip.").to(dev)
    if not hasattr(scorer.model, "encode_text"):
        raise ConfigError(f"config key 'clip.model' = {spec.clip.model!r} has no text tower: text conditions need one")
    if spec.clip.pretrained is None:
        print("text conditions score with a random-init CLIP (clip.pretrained: null): plumbing only, no meaning",
              flush=True)
    return scorer


def _lpips(spec, conditions, dev):
    from infd.losses import build_lpips

    if not any(getattr(c, "loss", "") == "lpips" for c in conditions):
        return None
    try:
        return build_lpips(spec.lpips).to(dev).eval()
    except FileNotFoundError as err:
        raise ConfigError(f"config key 'lpips' = {spec.lpips!r}: {err}") from None


def _kind(cond) -> str:
    return "text" if hasattr(cond, "prompt") else f"image_{cond.loss}"


def _xyxy(box) -> list[int]:
    top, left, bottom, right = box
    return [left, top, right, bottom]


def _layout(image, conditions):
    """The solution with each condition's box drawn and labelled."""
    from PIL import ImageDraw

    from infd.image import tensor_to_pil

    pil = tensor_to_pil(image)
    draw = ImageDraw.Draw(pil)
    for i, cond in enumerate(conditions):
        top, left, bottom, right = cond.box
        draw.rectangle((left, top, right - 1, bottom - 1), outline=(255, 40, 40), width=max(1, pil.width // 256))
        label = f"{i}: {cond.prompt}" if hasattr(cond, "prompt") else f"{i}: image {tuple(cond.out_size)}"
        draw.text((left + 3, top + 2), label, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return pil
