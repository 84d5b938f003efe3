"""The neural-field autoencoder: encoder -> bottleneck -> decoder (phi) -> renderer."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from infd.keyed_random import KeyedRandom
from infd.models.autoencoder_nets import ConvNetConfig, Decoder, Encoder
from infd.models.bottleneck import Bottleneck, BottleneckConfig, BottleneckOutput
from infd.models.renderers import RendererConfig, build_renderer


@dataclass
class AutoencoderInitConfig:
    """Where the encoder and decoder weights start from (paper section 5.6). Empty: random init.

    autoencoder: a diffusers folder (a Stable Diffusion root containing `vae/`, or the `vae/`
    folder itself: config.json + diffusion_pytorch_model.safetensors), or one LDM/CompVis
    checkpoint file (.safetensors / .ckpt; a whole SD checkpoint's `first_stage_model.*` or a bare
    first-stage / VQ-f4 checkpoint). Read by infd.convert.autoencoder.build_autoencoder only:
    NeuralFieldAutoencoder(cfg) never touches it, so exports rebuild without the source.
    format: auto = a directory is diffusers, a file is ldm.
    """

    autoencoder: str = ""
    format: Literal["auto", "diffusers", "ldm"] = "auto"


@dataclass
class AutoencoderConfig:
    net: ConvNetConfig = field(default_factory=ConvNetConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    init: AutoencoderInitConfig = field(default_factory=AutoencoderInitConfig)
    # Encoder, quant_conv (and the VQ codebook) fixed: the latents stay exactly the source model's,
    # so a converted SD VAE keeps SD's UNet and text encoder valid for stage 2 (paper section 5.6).
    freeze_encoder: bool = False


@dataclass
class AutoencoderOutput:
    rgb: Tensor  # (B, 3, H, W) rendered at the query coords
    phi: Tensor  # (B, C, h*f, w*f)
    bottleneck: BottleneckOutput
    head_input: object  # the renderer output layer's input (see renderer.head_weight_grad)


class NeuralFieldAutoencoder(nn.Module):
    """Image (B, 3, 256, 256) -> z (B, 3, 64, 64) -> phi (B, 128, 256, 256) -> RGB at any coords.

    With cfg.freeze_encoder the encoder, the bottleneck's quant_conv and the VQ codebook have
    requires_grad False, run without autograd in forward and stay in eval mode: z is exactly what
    the source (converted) model gives. post_quant_conv, decoder and renderer train.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.bottleneck = Bottleneck(cfg.bottleneck, cfg.net.z_channels)
        self.encoder = Encoder(cfg.net, cfg.net.z_channels * self.bottleneck.encoder_channels_factor)
        self.decoder = Decoder(cfg.net)
        self.renderer = build_renderer(cfg.renderer, self.decoder.out_channels)
        if cfg.freeze_encoder:
            for module in self.frozen_modules():
                module.requires_grad_(False)
            self.encoder.eval()

    def frozen_modules(self) -> list[nn.Module]:
        """The modules freeze_encoder fixes (empty when it is off): encoder side up to the latent."""
        if not self.cfg.freeze_encoder:
            return []
        quantizer = [self.bottleneck.quantizer] if self.bottleneck.quantizer is not None else []
        return [self.encoder, self.bottleneck.quant_conv, *quantizer]

    def train(self, mode: bool = True) -> NeuralFieldAutoencoder:
        """As nn.Module.train, but a frozen encoder stays in eval mode (no dropout: z stays fixed)."""
        super().train(mode)
        if self.cfg.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> latent z (B, embed_dim, H/f, W/f), the diffusion target."""
        return self.bottleneck.latent(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Latent z (B, embed_dim, h, w) -> feature map phi (B, C, h*f, w*f)."""
        return self.decoder(self.bottleneck.to_decoder(z))

    def render(self, phi: Tensor, coords: Tensor, cells: Tensor) -> Tensor:
        """phi (B, C, h, w); coords, cells (B, H, W, 2) -> rgb (B, 3, H, W)."""
        return self.renderer(phi, coords, cells)

    def forward(self, x: Tensor, coords: Tensor, cells: Tensor, rand: KeyedRandom | None = None) -> AutoencoderOutput:
        """Training path: encode, bottleneck (with its loss), decode, render the queries.
        rand: per-sample keys for the bottleneck's random draws (the KL sample)."""
        # A frozen encoder keeps no activations for backward: saves its share of the memory.
        with torch.no_grad() if self.cfg.freeze_encoder else nullcontext():
            moments = self.bottleneck.quant_conv(self.encoder(x))
        bott = self.bottleneck.from_moments(moments, rand)
        phi = self.decoder(bott.z)
        rgb, head_input = self.renderer.forward_with_head_input(phi, coords, cells)
        return AutoencoderOutput(rgb, phi, bott, head_input)

    @property
    def last_layer(self) -> Tensor:
        """Weight the adaptive GAN weight is measured at (the renderer's output layer)."""
        return self.renderer.last_layer
