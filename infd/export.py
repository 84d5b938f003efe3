"""Exported models: safetensors weights + a JSON config that rebuilds the model.

No training code and no pickle are involved in loading, so an export is safe to share.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from infd.config import from_mapping, to_mapping
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.models.unet import UNetConfig, build_unet

FORMAT_VERSION = 1
# The model kinds an export can hold: name -> (config class, model class).
# (build_unet: our UNet, or diffusers' UNet2DConditionModel rebuilt from the config the export records.)
MODEL_KINDS = {"autoencoder": (AutoencoderConfig, NeuralFieldAutoencoder), "unet": (UNetConfig, build_unet)}
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_model(model: nn.Module, directory: str | Path, kind: str = "autoencoder", extra: dict | None = None) -> Path:
    """Write `directory`/model.safetensors and config.json. `extra` holds metadata (step, latent scale...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "config": to_mapping(model.cfg), "extra": extra or {}}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def read_export_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: an export directory holds {WEIGHTS} and {CONFIG}")
    return json.loads(path.read_text())


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from config.json and load model.safetensors onto `device` (eval mode)."""
    meta = read_export_config(directory)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"export format {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    cfg_cls, model_cls = MODEL_KINDS[meta["kind"]]
    model = model_cls(from_mapping(cfg_cls, meta["config"]))
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS), device=str(device)))
    model.export_extra = meta.get("extra", {})
    return model.to(device).eval()
