"""Model FLOP utilisation: the FLOPs a piece of work does, per second, over the peak the device
reaches in this process and dtype.

The peak is measured, not looked up: the best of a large matmul and a large 3x3 convolution
(whichever the device runs faster: on a CPU the convolution, on a GPU usually the matmul), each
timed after a warm-up. A CPU figure then says how far a step is from this machine's limit, and a
GPU figure means the same thing without a table of spec-sheet numbers.

    peak = measure_peak(torch.device("cpu"), torch.float32)
    flops = count_flops(lambda: model(x).sum().backward())
    mfu = flops / seconds / peak.flops_per_s
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Peak:
    flops_per_s: float  # the higher of the two below
    matmul_flops_per_s: float
    conv_flops_per_s: float
    dtype: str
    device: str


def count_flops(work: Callable[[], object]) -> int:
    """FLOPs of one call of `work` (forward and, if it runs one, backward) with PyTorch's FLOP formulas
    (torch.utils.flop_counter: matmuls, convolutions and attention at 2 per multiply-add; elementwise
    ops are not counted). A dispatch mode of our own rather than FlopCounterMode, whose module hooks
    break autograd.grad on a leaf (the stage-1 loss takes its gradient that way)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry  # heavy (fake tensors): only where FLOPs are counted

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                _Count.total += formula(*args, **kwargs, out_val=out)
            return out

    _Count.total = 0
    with _Count():
        work()
    return int(_Count.total)


def time_call(work: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall seconds of `repeats` calls after `warmup` (device work included)."""
    for _ in range(warmup):
        work()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak(device: torch.device, dtype: torch.dtype, size: int | None = None) -> Peak:
    """The device's reachable FLOP/s in `dtype`: an n x n matmul and a 3x3 convolution of a
    (batch, c, h, w) map, each the best of 3 timed calls. Sizes are large enough to leave the
    memory-bound regime (n = 2048 on a CPU, 8192 on a GPU)."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n**3 / time_call(lambda: a @ b, device)
    c, hw, batch = (256, 64, 32) if device.type == "cuda" else (128, 56, 4)
    x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
    conv_flops = 2 * batch * c * c * 9 * hw * hw
    with torch.no_grad():
        conv = conv_flops / time_call(lambda: F.conv2d(x, w, padding=1), device)
    return Peak(max(matmul, conv), matmul, conv, str(dtype).removeprefix("torch."), device.type)


class Phases:
    """Wall seconds per named phase of a step (forward, backward, ...), summed over calls; a no-op
    unless enabled (the device is synchronised at each boundary, which costs a little)."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        """The seconds so far, and zero again."""
        seconds, self.seconds = self.seconds, {}
        return seconds


def mfu(flops: int, seconds: float, peak: Peak) -> float:
    """Achieved FLOP/s over the peak, as a fraction."""
    return flops / seconds / peak.flops_per_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
