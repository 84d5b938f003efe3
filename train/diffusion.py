"""Stage 2: train the latent diffusion model (on a latent cache, or encoding images on the fly).

    python -m train.diffusion experiment=cpu_tiny data.loader.shards=LATENTS data.autoencoder=AE_EXPORT
    torchrun --nproc_per_node 8 -m train.diffusion experiment=ffhq_paper data.loader.shards=... deepspeed=zero3
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from infd.config import ConfigError
from infd.data.dataset import DataConfig
from infd.diffusion.schedule import DiffusionConfig
from infd.models.unet import UNetConfig
from infd.text import TextEncoderConfig
from train.config import DeepSpeedConfig, LoggerConfig, OptimConfig, RunConfig, TrainerConfig


@dataclass
class LatentDataConfig:
    kind: Literal["latents", "images"] = "latents"  # a latent cache, or image shards encoded on the fly
    loader: DataConfig = field(default_factory=DataConfig)
    autoencoder: str = ""  # export directory: encodes images (kind=images) and renders sample panels
    scale_samples: int = 256  # latents used to estimate the scale factor at start


@dataclass
class SamplePanelConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph", "a painting"])
    sampler: str = "ddim"
    steps: int = 20
    cfg_scale: float = 1.0
    latent_size: int = 64


@dataclass
class DiffusionTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="diffusion"))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(ema=True, ema_decay=0.9999))
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9.6e-5, betas=(0.9, 0.999), weight_decay=0.01))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    samples: SamplePanelConfig = field(default_factory=SamplePanelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self, prefix: str = "") -> None:
        if self.data.kind == "images" and not self.data.autoencoder:
            raise ConfigError("config key 'data.autoencoder' is empty: data.kind=images encodes on the fly and "
                              "needs an autoencoder export")
        if self.text.kind == "openclip" and self.unet.context_dim == 0:
            raise ConfigError("config key 'unet.context_dim' is 0 but text.kind=openclip: set it to the text "
                              "encoder's width (512 for ViT-B-32)")


def run(cfg: DiffusionTrainConfig, raw: dict) -> int:
    from train.app import run_stage
    from train.data import ShardBatches
    from train.stage2 import LatentBatches, Stage2Task

    def make_data(info):
        return LatentBatches(cfg.data, info) if cfg.data.kind == "latents" else ShardBatches(cfg.data, info)

    return run_stage(cfg, raw, lambda info: Stage2Task(cfg, info), make_data)


def main() -> None:
    from train.app import hydra_main

    hydra_main("diffusion", DiffusionTrainConfig, run, config_dir_name="diffusion")


if __name__ == "__main__":
    sys.exit(main())
