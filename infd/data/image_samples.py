"""Image samples for stage 1 (and stage 2 on image shards): the multi-scale patch of a raw
shard sample, its caption, and the batch they stack into."""
from __future__ import annotations

import json

import numpy as np
import torch

from infd.data.tar_samples import image_bytes
from infd.data.transforms import make_patch_sample


def caption_of(raw: dict) -> str:
    """A sample's caption: its .txt member (img2dataset), else the "caption" of its .json, else ""."""
    if "txt" in raw:
        return raw["txt"].decode("utf-8", "replace").strip()
    try:
        return (json.loads(raw["json"]).get("caption") if "json" in raw else None) or ""
    except (ValueError, AttributeError):
        return ""


def image_patch_sample(raw: dict, cfg, rng: np.random.Generator) -> dict:
    """cfg: a DataConfig (its patch settings)."""
    sample = make_patch_sample(image_bytes(raw), cfg.patch, rng)
    sample["caption"] = caption_of(raw)
    return sample


def collate_patches(samples: list[dict], worker: int, skips: dict) -> dict:
    """Stack samples: enc (B, 3, E, E) uint8, gt (B, 3, P, P) uint8, coords/cells (B, P, P, 2),
    r (B,), is_hr (B,), kept (B,), keys, captions; plus the worker id and its cumulative skip counts."""
    return {
        "enc": torch.stack([s["enc"] for s in samples]),
        "gt": torch.stack([s["gt"] for s in samples]),
        "coords": torch.stack([s["coords"] for s in samples]),
        "cells": torch.stack([s["cells"] for s in samples]),
        "r": torch.tensor([s["r"] for s in samples]),
        "is_hr": torch.tensor([s["is_hr"] for s in samples]),
        "kept": torch.tensor([s["kept"] for s in samples]),
        "keys": [s["key"] for s in samples],
        "captions": [s.get("caption", "") for s in samples],
        "worker": worker,
        "skips": skips,
    }
