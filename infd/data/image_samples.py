"""Image samples for stage 1 (and stage 2 on image shards): the multi-scale patch of a raw
shard sample, its caption, and the batch they stack into."""
from __future__ import annotations

import json

import numpy as np
import torch

from infd.data.batches import PatchBatch
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


def collate_patches(samples: list[dict]) -> PatchBatch:
    """Stack samples into a PatchBatch (uint8 images; no GT tensors when the samples have none)."""
    def stacked(key: str):
        return torch.stack([s[key] for s in samples]) if samples[0].get(key) is not None else None

    return PatchBatch(enc=stacked("enc"), gt=stacked("gt"), coords=stacked("coords"), cells=stacked("cells"),
                      r=torch.tensor([s["r"] for s in samples]), is_hr=torch.tensor([s["is_hr"] for s in samples]),
                      kept=torch.tensor([s["kept"] for s in samples]), keys=[s["key"] for s in samples],
                      captions=[s.get("caption", "") for s in samples], lowres=stacked("lowres"),
                      lowres_scale=torch.tensor([s["lowres_scale"] for s in samples]) if "lowres_scale" in samples[0]
                      else None)
