"""Peak memory of a block of work, the same way on CPU and GPU.

CPU: peak resident set size (VmHWM), reset through /proc/self/clear_refs (Linux).
GPU: the caching allocator's max_memory_allocated.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


@contextmanager
def track_peak(device: torch.device):
    """Yields a dict that holds, on exit, `peak_bytes`: peak memory above what was resident on entry."""
    result = {}
    base = resident_bytes(device)
    reset_peak(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["peak_bytes"] = peak_bytes(device) - base
