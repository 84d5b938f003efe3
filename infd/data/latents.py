"""Latent-cache samples: shards written by data_prep.encode_latents, read through the same
epoch-planned stream as images (exactly once per epoch, equal batches per rank, exact resume).

Per sample: KEY.latent.npy (fp16, (C, h, w), the pre-quantisation latent), optionally
KEY.latent_flip.npy (of the horizontally flipped image) and KEY.text.npy (text embedding),
and KEY.json (caption, label for class-conditional models, width, height).
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch

from infd.data.batches import LatentBatch
from infd.data.decode import SkipSample


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def latent_sample(raw: dict, cfg, rng: np.random.Generator) -> dict:
    """A cached latent (the flipped copy with probability 1/2 when present) and its caption."""
    if "latent.npy" not in raw:
        raise SkipSample("no_latent_member", raw.get("__key__", ""))
    key = "latent_flip.npy" if "latent_flip.npy" in raw and rng.random() < 0.5 else "latent.npy"
    meta = json.loads(raw["json"]) if "json" in raw else {}
    label = meta.get("label")
    sample = {"z": torch.from_numpy(load_npy(raw[key]).astype(np.float32)), "caption": meta.get("caption") or "",
              "label": -1 if label is None else int(label)}
    if "text.npy" in raw:
        sample["text"] = torch.from_numpy(load_npy(raw["text.npy"]).astype(np.float32))
    return sample


def collate_latents(samples: list[dict]) -> LatentBatch:
    """Stack samples into a LatentBatch (text embeddings only when every sample has one)."""
    text = torch.stack([s["text"] for s in samples]) if all("text" in s for s in samples) else None
    return LatentBatch(z=torch.stack([s["z"] for s in samples]),
                       labels=torch.tensor([s["label"] for s in samples], dtype=torch.long),
                       keys=[s["key"] for s in samples], captions=[s["caption"] for s in samples], text=text)
