from torch import nn

from infd.models.autoencoder import AutoencoderConfig, AutoencoderOutput, NeuralFieldAutoencoder
from infd.models.diffusers_unet import build_diffusers_unet
from infd.models.unet import UNet, UNetConfig

__all__ = ["AutoencoderConfig", "AutoencoderOutput", "NeuralFieldAutoencoder", "UNet", "UNetConfig", "build_unet"]


def build_unet(cfg: UNetConfig, load_pretrained: bool = False) -> nn.Module:
    """The UNet of cfg.kind: UNet(cfg) ("infd"), or a DiffusersUNet ("diffusers") built from
    cfg.diffusers_config (else cfg.pretrained's config.json), with cfg.pretrained's weights only
    when load_pretrained (kind "infd" has no pretrained weights: it ignores load_pretrained). The
    module's .cfg has diffusers_config, in_channels, context_dim filled."""
    if cfg.kind == "diffusers":
        return build_diffusers_unet(cfg, load_pretrained)
    return UNet(cfg)
