"""The neural-field autoencoder: encoder -> bottleneck -> decoder (phi) -> renderer."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from infd.keyed_random import KeyedRandom
from infd.models.autoencoder_nets import ConvNetConfig, Decoder, Encoder
from infd.models.bottleneck import Bottleneck, BottleneckConfig, BottleneckOutput
from infd.models.renderers import RendererConfig, build_renderer


@dataclass
class AutoencoderConfig:
    net: ConvNetConfig = field(default_factory=ConvNetConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)


@dataclass
class AutoencoderOutput:
    rgb: Tensor  # (B, 3, H, W) rendered at the query coords
    phi: Tensor  # (B, C, h*f, w*f)
    bottleneck: BottleneckOutput
    head_input: object  # the renderer output layer's input (see renderer.head_weight_grad)


class NeuralFieldAutoencoder(nn.Module):
    """Image (B, 3, 256, 256) -> z (B, 3, 64, 64) -> phi (B, 128, 256, 256) -> RGB at any coords."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.bottleneck = Bottleneck(cfg.bottleneck, cfg.net.z_channels)
        self.encoder = Encoder(cfg.net, cfg.net.z_channels * self.bottleneck.encoder_channels_factor)
        self.decoder = Decoder(cfg.net)
        self.renderer = build_renderer(cfg.renderer, self.decoder.out_channels)

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
        bott = self.bottleneck(self.encoder(x), rand)
        phi = self.decoder(bott.z)
        rgb, head_input = self.renderer.forward_with_head_input(phi, coords, cells)
        return AutoencoderOutput(rgb, phi, bott, head_input)

    @property
    def last_layer(self) -> Tensor:
        """Weight the adaptive GAN weight is measured at (the renderer's output layer)."""
        return self.renderer.last_layer
