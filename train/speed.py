"""The speed switches of `trainer` (autocast, compile, channels_last, tf32) applied to a stage's
networks and steps. Off by default: each changes results a little (bf16) or costs start-up time
(compile); tests/test_speed.py bounds how far each moves the losses, benchmarks/train_step.py
measures what each buys.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from infd.config import ConfigError
from train.config import TrainerConfig

log = logging.getLogger("train")


class Speed:
    def __init__(self, cfg: TrainerConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        if cfg.autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("config key 'trainer.autocast' = bf16: this GPU has no bf16; use none")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32

    def autocast(self):
        """The region of a step's forward passes (backward runs outside it)."""
        if self.cfg.autocast == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """compile, before the module goes into its DeepSpeed engine. (channels_last acts on the
        activations alone, `images`: the weights live in DeepSpeed's flat buffers, which cannot hold
        them in NHWC strides; the convolutions reorder them per call.)"""
        if self.cfg.compile:
            module.compile()  # in place: parameter names (checkpoints, exports) stay as they are
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (B, C, H, W) in the layout the convolutions take."""
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x
