"""Parameter counts and tensor shapes of a model config, without allocating its weights."""
from __future__ import annotations

import torch

from infd.models import AutoencoderConfig, NeuralFieldAutoencoder

COMPONENTS = ("encoder", "bottleneck", "decoder", "renderer")


def describe_autoencoder(cfg: AutoencoderConfig, input_size: int = 256) -> dict:
    """Parameter counts per component and the latent / phi shapes (C, H, W) for a square input.

    Built on the meta device: shapes come from a real forward, no memory is allocated. With
    cfg.init.autoencoder set, the converted model is described (its encoder and decoder shaped
    like the source's, read from config.json or the tensor shapes; no weights are loaded), and
    "source" says where it comes from and which decoder tail is dropped.
    """
    source = None
    if cfg.init.autoencoder:
        from infd.convert.autoencoder import converted_config, source_summary

        source, cfg = source_summary(cfg), converted_config(cfg)
    with torch.device("meta"):
        model = NeuralFieldAutoencoder(cfg)
        z = model.encode(torch.empty(1, cfg.net.in_channels, input_size, input_size))
        phi = model.decode(z)
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in COMPONENTS}
    params["total"] = sum(params.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": params, "trainable_params": trainable,
            "input_shape": [cfg.net.in_channels, input_size, input_size],
            "latent_shape": list(z.shape[1:]), "phi_shape": list(phi.shape[1:]),
            "downsample_factor": cfg.net.downsample_factor, "renderer": cfg.renderer.kind,
            "bottleneck": cfg.bottleneck.kind, "freeze_encoder": cfg.freeze_encoder, "source": source}
