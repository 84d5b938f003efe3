"""Batches for the trainers: the shard loader (with its epoch and position), or synthetic images.

Both yield the loader's batch dict (enc, gt, coords, cells, ...) and expose
state_dict()/load_state_dict() for exact resume, and skip counters for logging.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from infd.data.counters import merge_counts
from infd.data.dataset import build_loader, collate
from infd.data.transforms import make_patch_sample
from train.config import DataSourceConfig
from train.dist import DistInfo


class ShardBatches:
    """Endless iteration over epochs of the mixed-resolution loader."""

    def __init__(self, cfg: DataSourceConfig, info: DistInfo):
        self.loader = build_loader(cfg.loader, info.rank, info.world_size)
        self.dataset = self.loader.dataset
        self.epoch, self.batches_done = 0, 0
        self.skips: dict[int, dict] = {}

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self.batches_done) | {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches"]

    def restart_epoch(self, epoch: int) -> None:
        """After a resume at another world size the old position has no meaning here."""
        self.epoch, self.batches_done = epoch, 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict({"epoch": self.epoch, "batches": self.batches_done})
            for batch in self.loader:
                self.batches_done += 1
                self.skips[batch["worker"]] = batch["skips"]
                yield batch
            self.epoch, self.batches_done = self.epoch + 1, 0

    def skip_counts(self) -> dict:
        return merge_counts(self.skips)


def synthetic_image(seed: int, index: int, size: int) -> bytes:
    """A smooth random picture (a few coloured blobs over a gradient) as PNG bytes."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = rng.uniform(0, 1, 3)[None, None] + (xx[..., None] * rng.uniform(-0.5, 0.5, 3) +
                                               yy[..., None] * rng.uniform(-0.5, 0.5, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-0.8, 0.8, 3)
    stripes = 0.1 * np.sin(2 * np.pi * (xx * rng.integers(4, 24) + yy * rng.integers(4, 24)))
    img = np.clip(img + stripes[..., None], 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class SyntheticBatches:
    """Global micro-batch m of size B x world holds samples [m*B*world, (m+1)*B*world); rank r takes
    its B. Sample i depends only on (seed, i), so global batches do not depend on the world size."""

    def __init__(self, cfg: DataSourceConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.batch_size = cfg.loader.batch_size
        self.micro_batches = 0

    def state_dict(self) -> dict:
        return {"micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches = state["micro_batches"]

    def restart_epoch(self, epoch: int) -> None:  # position is world-size independent: keep it
        pass

    def set_global_position(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches

    def __iter__(self) -> Iterator[dict]:
        syn, patch = self.cfg.synthetic, self.cfg.loader.patch
        while True:
            base = (self.micro_batches * self.info.world_size + self.info.rank) * self.batch_size
            samples = []
            for i in range(base, base + self.batch_size):
                sample = make_patch_sample(synthetic_image(syn.seed, i, syn.image_size), patch,
                                           np.random.default_rng([syn.seed, i, 1]))
                sample.update(key=str(i), is_hr=False)
                samples.append(sample)
            self.micro_batches += 1
            yield collate(samples, 0, {})

    def skip_counts(self) -> dict:
        return {}


def build_batches(cfg: DataSourceConfig, info: DistInfo):
    return SyntheticBatches(cfg, info) if cfg.kind == "synthetic" else ShardBatches(cfg, info)


def to_device(batch: dict, device: torch.device) -> dict:
    from infd.data.transforms import to_unit_range

    return {"enc": to_unit_range(batch["enc"].to(device, non_blocking=True)),
            "gt": to_unit_range(batch["gt"].to(device, non_blocking=True)),
            "coords": batch["coords"].to(device, non_blocking=True),
            "cells": batch["cells"].to(device, non_blocking=True)}
