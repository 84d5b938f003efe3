"""The `infd solve SPEC` file (YAML or JSON), typed: what to solve for, under which conditions, how.

    unet: runs/x/export/unet          # UNet export (or a Stable Diffusion folder, with ae)
    ae: null                          # autoencoder export (default: the one the UNet export records)
    canvas: 2048x2048                 # WIDTHxHEIGHT of the solution
    prompt: ""                        # the UNet's own prompt (text-conditioned UNets)
    seeds: [0]                        # one solution per seed
    sampling: {sampler: ddim, steps: 50, eta: 0.0, cfg_scale: 1.0, guide_scale: 1.0, guide_grad: unet}
    conditions:
      - {image: low.png, box: [0, 0, 2048, 2048], size: 64x64}       # super-resolution of low.png
      - {text: a red car, box: [128, 128, 640, 640], weight: 1.0}    # CLIP on the box at 224 x 224
    clip: {model: ViT-B-32, pretrained: laion2b_s34b_b79k}          # text conditions (null: random init)
    lpips: pretrained                 # image conditions with loss lpips: pretrained | random | PATH
    out: solve_out                    # folder: solution_SEED.png, layout_SEED.png, residuals.jsonl

Boxes are [x0, y0, x1, y1] in canvas pixels (default: the whole canvas). An image condition compares the
box at `size` (default: the reference's own size; the reference is resampled to it with the project's one
rule, infd.image.resize_antialiased), by `loss` l2 (default) or lpips, over `mask` (an image, white where
it counts; optional). docs/solve.md has worked examples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infd.config import ConfigError, from_mapping, load_mapping
from infd.diffusion.spec import SamplingSpec
from infd.eval.clip_score import ClipScoreConfig


@dataclass
class ConditionSpec:
    box: list[int] | None = None  # x0, y0, x1, y1 in canvas pixels; default: the whole canvas
    image: str | None = None  # image condition: the reference
    size: str | None = None  # image: WIDTHxHEIGHT the box is compared at (default: the reference's)
    mask: str | None = None  # image: white where the condition counts
    loss: str = "l2"  # image: l2 | lpips
    text: str | None = None  # text condition: the prompt the box is scored against by CLIP
    weight: float = 1.0

    def validate(self, prefix: str = "") -> None:
        if (self.image is None) == (self.text is None):
            raise ConfigError(f"config key '{prefix}image' / '{prefix}text': a condition has exactly one of them")
        if self.loss not in ("l2", "lpips"):
            raise ConfigError(f"config key '{prefix}loss' = {self.loss!r}: choose l2 or lpips")
        if self.box is not None and len(self.box) != 4:
            raise ConfigError(f"config key '{prefix}box' = {self.box}: expected [x0, y0, x1, y1] in canvas pixels")
        if self.weight <= 0:
            raise ConfigError(f"config key '{prefix}weight' = {self.weight}: expected > 0")


@dataclass
class SolveSpec:
    unet: str = ""
    ae: str | None = None
    canvas: str = "1024x1024"
    prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    latent_size: int | None = None
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    conditions: list[ConditionSpec] = field(default_factory=list)
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    lpips: str = "pretrained"
    out: str = "solve_out"

    def validate(self, prefix: str = "") -> None:
        if not self.unet:
            raise ConfigError(f"config key '{prefix}unet': give the UNet export to sample from")
        if not self.conditions:
            raise ConfigError(f"config key '{prefix}conditions': give at least one condition (image or text)")
        if not self.seeds:
            raise ConfigError(f"config key '{prefix}seeds': give at least one seed")


def read_spec(path: str) -> tuple[SolveSpec, Path]:
    """(the spec, its folder: relative paths in it are read from there)."""
    where = Path(path)
    if not where.is_file():
        raise ConfigError(f"solve spec {path}: no such file (a YAML or JSON file, see docs/solve.md)")
    return from_mapping(SolveSpec, load_mapping(where)), where.resolve().parent


def box_of(cond: ConditionSpec, canvas: tuple[int, int], key: str) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a condition's [x0, y0, x1, y1] on a canvas of (H, W)."""
    if cond.box is None:
        return (0, 0, canvas[0], canvas[1])
    x0, y0, x1, y1 = cond.box
    if not (0 <= x0 < x1 <= canvas[1] and 0 <= y0 < y1 <= canvas[0]):
        raise ConfigError(f"config key '{key}.box' = {cond.box} lies outside the canvas of {canvas[1]}x{canvas[0]} "
                          "or is empty: expected 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height")
    return (y0, x0, y1, x1)
