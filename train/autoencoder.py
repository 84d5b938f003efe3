"""Stage 1: train the neural-field autoencoder.

    python -m train.autoencoder experiment=cpu_tiny trainer.max_steps=100 run.name=ae_tiny
    torchrun --nproc_per_node 8 -m train.autoencoder experiment=ffhq_paper data.loader.shards=...
    deepspeed --num_gpus 8 --no_local_rank -m train.autoencoder experiment=laion_hr
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infd.config import ConfigError
from infd.ema import EMA
from infd.export import save_model
from infd.losses import Stage1Loss, Stage1LossConfig
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from train.config import (DataSourceConfig, DeepSpeedConfig, LoggerConfig, OptimConfig, RunConfig, TrainerConfig)
from train.data import build_batches
from train.dist import DistInfo
from train.engines import build_engine, deepspeed_config
from train.stage1 import Stage1Step, image_panels


@dataclass
class AutoencoderTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="autoencoder"))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self, prefix: str = "") -> None:
        if self.data.loader.patch.encoder_size != self.model.net.resolution:
            raise ConfigError(
                f"config key 'data.loader.patch.encoder_size' = {self.data.loader.patch.encoder_size} differs from "
                f"'model.net.resolution' = {self.model.net.resolution}: the encoder is built for, and exported "
                "with, its input size; set both to the same value")
        if self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "config key 'deepspeed.zero_stage' = 3 is not supported for the autoencoder: the adaptive GAN "
                "weight needs the full gradient of the renderer's last layer on every rank before the "
                "generator's backward, which ZeRO-3 partitions away. Use zero_stage 1 or 2 (the model is 58M "
                "parameters; ZeRO-2 already partitions its optimizer states and gradients).")


class Stage1Task:
    """What the shared loop needs from stage 1."""

    def __init__(self, cfg: AutoencoderTrainConfig, info: DistInfo):
        torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank
        model = NeuralFieldAutoencoder(cfg.model).to(info.device)
        disc = PatchDiscriminator(cfg.disc).to(info.device)
        micro = cfg.data.loader.batch_size
        self.gen = build_engine(model, cfg.optim, deepspeed_config(cfg.deepspeed, micro, info))
        self.disc = build_engine(disc, cfg.disc_optim, deepspeed_config(cfg.deepspeed, micro, info))
        self.engines = {"generator": self.gen, "discriminator": self.disc}
        self.ema = EMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema else None
        loss = Stage1Loss(cfg.loss).to(info.device)
        self.step = Stage1Step(self.gen, self.disc, loss, info, self.ema)
        self.info = info

    def images(self, batch: dict) -> dict:
        return image_panels(self.gen.module, batch, self.info.device)

    def export(self, run_dir: Path, step: int) -> Path | None:
        if not self.info.is_main:
            return None
        model = self.gen.module
        if self.ema is not None:
            model = NeuralFieldAutoencoder(model.cfg).to(self.info.device)
            model.load_state_dict(self.gen.module.state_dict())
            self.ema.copy_to(model)
        path = save_model(model, run_dir / "export" / "autoencoder", extra={"step": step, "ema": self.ema is not None})
        print(f"exported the {'EMA ' if self.ema else ''}autoencoder to {path}", flush=True)
        return path


def run(cfg: AutoencoderTrainConfig, raw: dict) -> int:
    from train.app import run_stage

    return run_stage(cfg, raw, lambda info: Stage1Task(cfg, info), lambda info: build_batches(cfg.data, info))


def main() -> None:
    from train.app import hydra_main

    hydra_main("autoencoder", AutoencoderTrainConfig, run)


if __name__ == "__main__":
    sys.exit(main())
