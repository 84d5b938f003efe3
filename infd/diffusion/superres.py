"""Super-resolution by a UNet conditioned on a low-resolution image (issue 28), as `infd upsample --unet` and
`infd eval-sr` run it: the input is resized to the encoder's input with the project's one resampling rule and
encoded by the frozen encoder; its latent conditions the sampled latent (Conditioning.lowres); the result is
rendered at any size from the autoencoder's decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from infd.diffusion.generate import LatentDiffusion, generate_latents
from infd.diffusion.spec import Conditioning, SamplingSpec


def encoder_input(image: Image.Image | Tensor, resolution: int) -> Tensor:
    """An image (PIL, or (3, h, w) in [-1, 1]) -> (1, 3, r, r) in [-1, 1], resized with
    infd.image.resize_antialiased (a tensor goes through 8-bit pixels, as a saved file would)."""
    from infd.image import pil_to_tensor, resize_antialiased, tensor_to_pil

    pil = tensor_to_pil(image) if isinstance(image, Tensor) else image
    if pil.size != (resolution, resolution):
        pil = resize_antialiased(pil, (resolution, resolution))
    return pil_to_tensor(pil)[None]


@torch.no_grad()
def encode_images(ae: nn.Module, images: list, device) -> Tensor:
    """Images (PIL or (3, h, w) tensors) -> their latents (B, C, h, w) at the encoder's input size."""
    r = ae.cfg.net.resolution
    return ae.encode(torch.cat([encoder_input(img, r) for img in images]).to(device))


@dataclass
class SuperResolver:
    """A super-resolution UNet (unet.lowres_channels) with its schedule, and the sampling options."""

    model: LatentDiffusion
    spec: SamplingSpec

    def latents(self, lowres: Tensor, seeds: list[int], zero_condition: bool = False,
                progress: bool = False) -> Tensor:
        """lowres (B, C, h, w): the inputs' latents -> sampled latents (B, C', h, w), sample i from seed i.
        zero_condition: the condition replaced by zeros (an ablation: what the condition adds)."""
        cond = torch.zeros_like(lowres) if zero_condition else lowres
        shape = (lowres.shape[0], self.model.unet.cfg.in_channels, *lowres.shape[2:])
        return generate_latents(self.model, self.spec, Conditioning(lowres=cond), shape, list(seeds), progress)
