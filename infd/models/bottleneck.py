"""Bottlenecks between encoder and decoder: vector quantisation, diagonal Gaussian, none.

Each holds its 1x1 convs in and out of the latent space (LDM's quant_conv / post_quant_conv).
Three entry points:
  forward(h)   training path: encoder features -> decoder input, with its loss and statistics
  latent(h)    encoder features -> the latent z that diffusion models (VQ: pre-quantisation)
  to_decoder(z) latent z -> decoder input (VQ: quantise here, at the decoder input)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infd.config import ConfigError
from infd.keyed_random import KeyedRandom
from infd.utils.precision import full_precision


@dataclass
class BottleneckConfig:
    kind: Literal["vq", "kl", "none"] = "vq"
    embed_dim: int = 3  # latent channels z
    n_codes: int = 8192  # vq only
    beta: float = 0.25  # vq: weight of the second term of the VQ loss (see `legacy`)
    # vq loss form. legacy (taming-transformers' legacy=True, which the paper's code uses):
    # mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2), the encoder pulled to its code with weight 1.
    # Otherwise the VQ-VAE paper's form: codebook term weight 1, commitment (encoder) term beta.
    legacy: bool = False

    def validate(self, prefix: str = "") -> None:
        if self.kind == "vq" and self.n_codes < 2:
            raise ConfigError(f"config key '{prefix}n_codes' must be >= 2 for kind=vq")


@dataclass
class BottleneckOutput:
    z: Tensor  # decoder input (B, z_channels, h, w)
    loss: Tensor  # scalar: VQ codebook + commitment, or KL; zero for none
    stats: dict  # scalars for logging (code usage, perplexity, kl)


class VectorQuantizer(nn.Module):
    """Codebook lookup with straight-through gradients. z (B, D, h, w) -> same shape."""

    def __init__(self, n_codes: int, dim: int, beta: float, legacy: bool = False):
        super().__init__()
        self.beta, self.legacy = beta, legacy
        self.codebook = nn.Embedding(n_codes, dim)
        self.codebook.weight.data.uniform_(-1.0 / n_codes, 1.0 / n_codes)

    def codes(self, z: Tensor) -> Tensor:
        """Index of the nearest code per position. (B, D, h, w) -> (B, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        book = self.codebook.weight.float()
        with full_precision(z.device.type):  # under a bf16 autocast, nearby codes would tie
            book_sq = book.pow(2).sum(1)
            # Chunked so the (positions x codes) distance matrix stays small (8192 codes x 32K positions = 1 GB).
            idx = [(book_sq - 2 * chunk @ book.t()).argmin(1) for chunk in flat.split(4096)]
        return torch.cat(idx).view(z.shape[0], *z.shape[2:])

    def lookup(self, idx: Tensor) -> Tensor:
        """(B, h, w) indices -> (B, D, h, w) code vectors."""
        return self.codebook(idx).permute(0, 3, 1, 2)

    def forward(self, z: Tensor):
        idx = self.codes(z)
        zq = self.lookup(idx).to(z.dtype)
        codebook, commitment = F.mse_loss(zq, z.detach()), F.mse_loss(z, zq.detach())
        loss = commitment + self.beta * codebook if self.legacy else codebook + self.beta * commitment
        return z + (zq - z).detach(), loss, self.usage(idx)

    def usage(self, idx: Tensor) -> dict:
        counts = torch.bincount(idx.flatten(), minlength=self.codebook.num_embeddings).float()
        probs = counts / counts.sum()
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        return {"vq/perplexity": entropy.exp().detach(), "vq/codes_used": (counts > 0).float().mean().detach()}


class Bottleneck(nn.Module):
    def __init__(self, cfg: BottleneckConfig, z_channels: int):
        super().__init__()
        self.kind = cfg.kind
        moments = 2 if cfg.kind == "kl" else 1
        self.quant_conv = nn.Conv2d(moments * z_channels, moments * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, z_channels, 1)
        self.quantizer = VectorQuantizer(cfg.n_codes, cfg.embed_dim, cfg.beta, cfg.legacy) if cfg.kind == "vq" else None

    @property
    def encoder_channels_factor(self) -> int:
        """Encoder output channels per latent channel (2 for mean and log-variance)."""
        return 2 if self.kind == "kl" else 1

    def latent(self, h: Tensor) -> Tensor:
        """Encoder features -> latent z (B, embed_dim, h, w): pre-quantisation for vq, mean for kl."""
        moments = self.quant_conv(h)
        return moments.chunk(2, dim=1)[0] if self.kind == "kl" else moments

    def to_decoder(self, z: Tensor) -> Tensor:
        """Latent z -> decoder input (quantised for vq). When z needs a gradient (guided sampling renders
        regions of a z estimate) the quantiser passes it straight through, as in training; otherwise the
        codes are used as they are."""
        if self.quantizer is not None:
            zq = self.quantizer.lookup(self.quantizer.codes(z)).to(z.dtype)
            z = z + (zq - z).detach() if torch.is_grad_enabled() and z.requires_grad else zq
        return self.post_quant_conv(z)

    def forward(self, h: Tensor, rand: KeyedRandom | None = None) -> BottleneckOutput:
        """h (B, z_channels, h, w). rand: per-sample keys for the KL sample (training); without
        it the sample comes from the global RNG."""
        return self.from_moments(self.quant_conv(h), rand)

    def from_moments(self, moments: Tensor, rand: KeyedRandom | None = None) -> BottleneckOutput:
        """forward after quant_conv: moments (B, moments * embed_dim, h, w) -> decoder input and loss.
        Split out so a frozen encoder can run quant_conv without autograd."""
        if self.kind == "vq":
            z, loss, stats = self.quantizer(moments)
        elif self.kind == "kl":
            z, loss, stats = _gaussian_sample(moments, self.training, rand)
        else:
            z, loss, stats = moments, moments.new_zeros(()), {}
        return BottleneckOutput(self.post_quant_conv(z), loss, stats)


def _gaussian_sample(moments: Tensor, sample: bool, rand: KeyedRandom | None):
    """Diagonal Gaussian posterior: sample (or mean) and KL to N(0, I), summed per sample, averaged over batch."""
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean
    if sample:
        eps = torch.randn_like(mean) if rand is None else rand.randn(mean.shape[1:], "kl").to(mean.dtype)
        z = mean + eps * (0.5 * logvar).exp()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
    return z, kl, {"kl": kl.detach()}
