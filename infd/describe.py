"""Parameter counts and tensor shapes of a model config, without allocating its weights."""
from __future__ import annotations

import torch

from infd.models import AutoencoderConfig, NeuralFieldAutoencoder

COMPONENTS = ("encoder", "bottleneck", "decoder", "renderer")


def describe_autoencoder(cfg: AutoencoderConfig, input_size: int = 256) -> dict:
    """Parameter counts per component and the latent / phi shapes (C, H, W) for a square input.

    Built on the meta device: shapes come from a real forward, no memory is allocated.
    """
    with torch.device("meta"):
        model = NeuralFieldAutoencoder(cfg)
        z = model.encode(torch.empty(1, cfg.net.in_channels, input_size, input_size))
        phi = model.decode(z)
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in COMPONENTS}
    params["total"] = sum(params.values())
    return {"params": params, "input_shape": [cfg.net.in_channels, input_size, input_size],
            "latent_shape": list(z.shape[1:]), "phi_shape": list(phi.shape[1:]),
            "renderer": cfg.renderer.kind, "bottleneck": cfg.bottleneck.kind}
