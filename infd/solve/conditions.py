"""Conditions on boxes of the canvas, each at its own scale, and the guide that scores a latent against them.

- `ImageCondition`: a reference image for a box, compared at the reference's own resolution (the box is
  rendered at that size): the squared L2 distance over the (masked) pixels, or LPIPS. A whole-canvas
  condition with a small reference is super-resolution; a mask is inpainting; a low-resolution condition on
  the whole canvas plus a high-resolution one on a small box is the multi-scale case.
- `TextCondition`: CLIP similarity between the box rendered at the CLIP tower's input size and a prompt
  (the paper's zero-shot layout-to-image, section 5.5); loss 1 - cos.

`RegionGuide(z)` decodes phi = D(z) once, renders each condition's box and returns each condition's weighted
loss per sample; `residuals(z)` the per-condition figures that are reported (RMSE in [-1, 1]
units for L2, the LPIPS distance, 1 - cos for text).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from infd.render import Box
from infd.solve.region import check_box, render_box


@dataclass
class ImageCondition:
    """reference (3, h, w) in [-1, 1]: the box at that resolution; mask (h, w) in [0, 1], 1 where it counts."""

    box: Box
    reference: Tensor
    mask: Tensor | None = None
    loss: str = "l2"  # l2 | lpips
    weight: float = 1.0

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(self.reference.shape[-2:])


@dataclass
class TextCondition:
    box: Box
    prompt: str
    weight: float = 1.0


Condition = ImageCondition | TextCondition


@dataclass
class RegionGuide:
    """Conditions on boxes of a canvas of `canvas` (H, W) pixels, scored on renders of a latent z in the
    autoencoder's units. clip: a ClipScorer (text conditions); lpips: an LPIPS module (image conditions with
    loss lpips); tile_rows: see infd.solve.region.render_box."""

    ae: nn.Module
    canvas: tuple[int, int]
    conditions: list[Condition]
    clip: nn.Module | None = None
    lpips: nn.Module | None = None
    tile_rows: int | None = None
    _text: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for i, cond in enumerate(self.conditions):
            check_box(self.canvas, cond.box, f"condition {i}'s box")
            if isinstance(cond, TextCondition) and self.clip is None:
                raise ValueError(f"condition {i} is a text condition: it needs a CLIP model (RegionGuide.clip)")
            if isinstance(cond, ImageCondition) and cond.loss not in ("l2", "lpips"):
                raise ValueError(f"condition {i}: loss {cond.loss!r}, expected l2 or lpips")
            if isinstance(cond, ImageCondition) and cond.loss == "lpips" and self.lpips is None:
                raise ValueError(f"condition {i} uses LPIPS: it needs an LPIPS model (RegionGuide.lpips)")

    def losses(self, z: Tensor) -> Tensor:
        """z (B, C, h, w) -> each condition's loss (B, K), differentiable in z."""
        phi = self.ae.decode(z)
        return torch.stack([self._loss(cond, phi) for cond in self.conditions], dim=1)

    def __call__(self, z: Tensor) -> Tensor:
        """The conditions' weighted losses (B, K) (infd/solve/dps.py steps on each; a weight w scales its
        condition's step by sqrt(w))."""
        weights = torch.tensor([c.weight for c in self.conditions], device=z.device, dtype=z.dtype)
        return self.losses(z) * weights

    def residuals(self, z: Tensor) -> Tensor:
        """Each condition's reported residual (B, K): RMSE over its (masked) pixels, LPIPS, or 1 - cos."""
        with torch.no_grad():
            losses = self.losses(z)
        out = losses.clone()
        for k, cond in enumerate(self.conditions):
            if isinstance(cond, ImageCondition) and cond.loss == "l2":
                out[:, k] = (losses[:, k] / _counted(cond)).sqrt()
        return out

    def measured(self, image: Tensor) -> list[float]:
        """Each condition's residual on a rendered canvas image (3, H, W) in [-1, 1] (the tiled output): its box
        cropped and resampled to the condition's resolution with infd.image.resize_antialiased."""
        out = []
        with torch.no_grad():
            for cond in self.conditions:
                size = (self.clip.image_size,) * 2 if isinstance(cond, TextCondition) else cond.out_size
                crop = _resampled(image, cond.box, size).unsqueeze(0)
                if isinstance(cond, TextCondition):
                    emb = self.clip.embed_images(crop.to(self.clip.mean.device))
                    out.append(float(1 - (emb * self._text_embedding(cond.prompt)).sum()))
                elif cond.loss == "lpips":
                    out.append(float(self.lpips(crop, cond.reference.unsqueeze(0).to(crop.dtype))))
                else:
                    diff = crop - cond.reference.to(crop.dtype)
                    if cond.mask is not None:
                        diff = diff * cond.mask.to(crop.dtype)
                    out.append(float((diff.pow(2).sum() / _counted(cond)).sqrt()))
        return out

    def _loss(self, cond: Condition, phi: Tensor) -> Tensor:
        if isinstance(cond, TextCondition):
            size = self.clip.image_size
            rgb = render_box(self.ae.renderer, phi, self.canvas, cond.box, (size, size), self.tile_rows)
            return 1 - (self.clip.embed_images(rgb) * self._text_embedding(cond.prompt)).sum(-1)
        rgb = render_box(self.ae.renderer, phi, self.canvas, cond.box, cond.out_size, self.tile_rows)
        ref = cond.reference.to(rgb.device, rgb.dtype).expand_as(rgb)
        if cond.loss == "lpips":
            return self.lpips(rgb, ref).flatten()
        diff = rgb - ref
        if cond.mask is not None:
            diff = diff * cond.mask.to(rgb.device, rgb.dtype)
        return diff.pow(2).flatten(1).sum(1)

    def _text_embedding(self, prompt: str) -> Tensor:
        if prompt not in self._text:
            with torch.no_grad():
                self._text[prompt] = self.clip.embed_texts([prompt])
        return self._text[prompt]


def _resampled(image: Tensor, box: Box, size: tuple[int, int]) -> Tensor:
    """The box (top, left, bottom, right) of image (3, H, W) resampled to size (h, w), through 8-bit pixels as
    a saved image is."""
    from infd.image import pil_to_tensor, resize_antialiased, tensor_to_pil

    top, left, bottom, right = box
    return pil_to_tensor(resize_antialiased(tensor_to_pil(image), size, (left, top, right, bottom)))


def _counted(cond: ImageCondition) -> float:
    """Values an L2 condition sums over: 3 x its (masked) pixels."""
    pixels = float(cond.mask.sum()) if cond.mask is not None else cond.out_size[0] * cond.out_size[1]
    return max(3 * pixels, 1.0)
