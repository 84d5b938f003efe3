"""Working with ZeRO-3 partitioned parameters: gathering them, and an EMA that does."""
from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from infd.ema import EMA


def gathered(module: nn.Module):
    """Full parameters inside the block, also under ZeRO-3 (collective: every rank enters it)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


class GatheredEMA(EMA):
    """EMA that also works when ZeRO-3 partitions the parameters: gathers them for each use
    (collective: every rank updates)."""

    def __init__(self, model: nn.Module, decay: float):
        with gathered(model):
            super().__init__(model, decay)

    def update(self, model: nn.Module) -> None:
        with gathered(model):
            super().update(model)
