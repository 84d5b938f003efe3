"""Mixed precision: the places that stay in fp32 under a bf16 autocast of the training step.

An autocast region casts matmuls and convolutions to bf16 (8 bits of mantissa). What must not
lose those bits is computed inside `full_precision()`: the VQ bottleneck's code distances
(nearby codes would tie), the gradients behind the adaptive GAN weight (a ratio of two norms),
and loss reductions (the callers cast to fp32 before summing).
"""
from __future__ import annotations

import contextlib

import torch


def full_precision(device_type: str):
    """A region where autocast is off: inputs must be cast to fp32 by the caller. Devices without an
    autocast (meta tensors: `infd describe`) have nothing to turn off."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
