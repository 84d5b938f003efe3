"""Typed configuration of the training applications; Hydra YAML only selects and overrides.

train/app.py gives Hydra the full key set with the dataclass defaults (so every key can
be overridden as `a.b=c` and a misspelt override fails naming the key); `from_mapping` then
builds and validates the dataclasses (types, choices, ranges) once at start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from infd.config import ConfigError
from infd.data.loader import DataConfig


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "runs"
    # A file that local rank 0 of every node writes when the run stops on a signal with its checkpoint
    # saved (train/stop_status.py); the launch scripts under cluster/ set it to a node-local path and
    # turn it into their exit status, 128 + the signal's number.
    stop_report: str | None = None


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    ckpt_every: int = 500
    keep_last: int = 3
    # Periodic checkpoints are written by a background thread after a snapshot to host memory (training
    # goes on meanwhile; the next save waits for it). A stop signal's and the last step's never are.
    ckpt_async: bool = True
    resume: str = "auto"  # auto | never | a checkpoint directory
    log_every: int = 10
    image_every: int = 500
    seed: int = 0
    ema: bool = False
    ema_decay: float = 0.999
    sample_log: bool = False  # samples/rank*.jsonl: per step, the keys each rank trained on and their random draws
    # Seconds between a stop signal and SIGKILL on your cluster (SLURM KillWait or GraceTime, Kubernetes
    # terminationGracePeriodSeconds, torchrun --shutdown_timeout, the deepspeed launcher's 30 s): a
    # checkpoint that takes longer is warned about at each save and in the preflight.
    grace_s: float = 30.0
    # Also export (export/step_XXXXXXX/<kind>/) the checkpoints of the steps that are multiples of it, and
    # the one a stop signal saves when the grace period has room; 0: only at the end. train.export does any.
    export_every: int = 0
    # An export directory (infd.export layout) whose weights start the run, with a fresh optimizer:
    # fine-tuning. The model's shape comes from the export; a checkpoint to resume from wins over it.
    init_from: str = ""
    # Evaluate every this many steps with the EMA weights (stage 2: FID/pFID, stage 1: reconstruction
    # PSNR/LPIPS; the `eval` section says on what), logged as eval/* to W&B and metrics.jsonl; 0: never.
    eval_every: int = 0
    # Speed switches (train/speed.py; each one's agreement with the default is tested, tests/test_speed.py).
    # autocast: the forward passes in bf16 where the device has it (GPUs, CPUs with AVX512-BF16); weights,
    # optimizer, VQ distances, the adaptive GAN weight and loss reductions stay fp32.
    autocast: Literal["none", "bf16"] = "none"
    compile: bool = False  # torch.compile of the trained networks (Module.compile: checkpoints keep their keys)
    channels_last: bool = False  # NHWC activations for the convolutions (the weights stay in DeepSpeed's buffers)
    tf32: bool = True  # GPU matmuls and convolutions in TF32 (Ampere and later); nothing on a CPU

    def validate(self, prefix: str = "") -> None:
        for name in ("max_steps", "ckpt_every", "keep_last", "log_every", "image_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}' must be >= 1")
        if self.grace_s <= 0:
            raise ConfigError(f"config key '{prefix}grace_s' must be > 0 (seconds from a stop signal to SIGKILL)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"config key '{prefix}ema_decay' must be in (0, 1)")
        if self.eval_every < 0:
            raise ConfigError(f"config key '{prefix}eval_every' must be >= 0 (0: no evaluation in training)")
        if self.export_every < 0:
            raise ConfigError(f"config key '{prefix}export_every' must be >= 0 (0: export only at the end)")


@dataclass
class OptimConfig:
    lr: float = 3.6e-5
    betas: tuple[float, ...] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # torch's Adam implementation: default (a loop over tensors on a CPU, foreach on a GPU), foreach (one
    # kernel per op over all tensors) or fused (one kernel for the whole update; CPU and GPU).
    impl: Literal["default", "foreach", "fused"] = "default"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the GPU has it, else fp32
    grad_clip: float = 0.0  # 0 disables
    grad_accum: int = 1

    def validate(self, prefix: str = "") -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key '{prefix}zero_stage' = {self.zero_stage}; choose 0, 1, 2 or 3")
        if self.grad_accum < 1:
            raise ConfigError(f"config key '{prefix}grad_accum' must be >= 1")


@dataclass
class SyntheticDataConfig:
    """Deterministic generated samples (images for stage 1, latents for stage 2): sample i depends
    only on (seed, i), so a global batch is the same at any world size (used to compare
    distributed runs and for smoke tests)."""

    image_size: int = 384
    latent_size: int = 16
    seed: int = 0


@dataclass
class DataSourceConfig:
    """What a stage trains on: `shards` (image shards; stage 2 encodes them on the fly with
    `autoencoder`), `latents` (a latent cache from data_prep.encode_latents, stage 2) or
    `synthetic`. The shard loader's settings are `loader`."""

    kind: Literal["shards", "latents", "synthetic"] = "synthetic"
    loader: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    autoencoder: str = ""  # stage 2: export that encodes image shards and renders the sample panels


@dataclass
class LoggerConfig:
    kind: Literal["none", "wandb"] = "none"
    project: str = "infd"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; default from WANDB_MODE
    tags: list[str] = field(default_factory=list)

