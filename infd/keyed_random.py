"""Random numbers keyed by (seed, step, global sample index, purpose).

Training draws its per-sample randomness (diffusion noise and timestep, caption dropout, the KL
sample) from here rather than from a global RNG. A global RNG seeded alike on every rank gives
every rank the same draws (a global batch of 8 ranks then holds only batch-size-many distinct
timesteps); one seeded per rank makes the draws depend on the number of ranks. Keyed by the
sample's index in the global batch, a sample gets the same draws whether 1 or 64 ranks train,
so a run's losses do not depend on the world size, and no two samples share a draw.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


class KeyedRandom:
    """Per-sample draws for the samples `indices` (their positions in the step's global batch).

    Every method returns a (B, ...) tensor whose row b depends only on (seed, step, indices[b],
    purpose), so splitting a batch over ranks does not change any sample's draw.
    """

    def __init__(self, seed: int, step: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.seed, self.step, self.indices = int(seed), int(step), [int(i) for i in indices]
        self.device = torch.device(device)

    def _generators(self, purpose: str) -> list[torch.Generator]:
        tag = zlib.crc32(purpose.encode())  # stable across processes, unlike hash()
        gens = []
        for index in self.indices:
            state = np.random.SeedSequence([self.seed, self.step, index, tag]).generate_state(2, np.uint64)
            gens.append(torch.Generator(device=self.device).manual_seed(int(state[0] >> np.uint64(1))))
        return gens

    def randn(self, shape: Sequence[int], purpose: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal (B, *shape)."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self._generators(purpose)])

    def rand(self, purpose: str) -> Tensor:
        """Uniform in [0, 1), (B,)."""
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self._generators(purpose)])

    def randint(self, high: int, purpose: str) -> Tensor:
        """Integers in [0, high), (B,)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=self.device)
                          for g in self._generators(purpose)])


def global_batch_indices(micro_batch: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """Positions in the step's global batch of one rank's micro-batch: micro-batch m of the step
    holds global positions [m * W * B, (m + 1) * W * B), rank r the B from (m * W + r) * B."""
    first = (micro_batch * world_size + rank) * batch_size
    return list(range(first, first + batch_size))
