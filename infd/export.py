"""Exported models: safetensors weights + a JSON record that rebuilds the model and says how to use it.

`ExportRecord` is everything an export holds besides its weights: the model kind and config, the
step and whether the weights are an EMA, and for a UNet what sampling needs (its schedule with the
latent scale, its text encoder, its default sampling spec, the autoencoder it pairs with). It is
written and read here only; `load_export` returns the model and its record. Exports of format 1
(metadata in an "extra" mapping) are read through infd.compat.

No training code and no pickle are involved in loading, so an export is safe to share.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from infd.compat import export_meta_v2
from infd.config import ConfigError, from_mapping, to_mapping
from infd.diffusion.schedule import DiffusionConfig
from infd.diffusion.spec import SamplingSpec
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.models import UNetConfig, build_unet
from infd.text import TextEncoderConfig

FORMAT_VERSION = 2
# The model kinds an export can hold: name -> (config class, model class).
# (build_unet: our UNet, or diffusers' UNet2DConditionModel rebuilt from the config the export records.)
MODEL_KINDS = {"autoencoder": (AutoencoderConfig, NeuralFieldAutoencoder), "unet": (UNetConfig, build_unet)}
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# The record's typed sections besides the model config: JSON key -> config class.
_SECTIONS = {"diffusion": DiffusionConfig, "text": TextEncoderConfig, "sampling": SamplingSpec}


@dataclass(frozen=True)
class ExportRecord:
    """What an export holds besides its weights.

    kind: "autoencoder" or "unet" (MODEL_KINDS); model: its AutoencoderConfig or UNetConfig.
    step, ema: the training step exported and whether the weights are its EMA (None: not from a run).
    UNet exports (None elsewhere, and for a UNet of unknown provenance):
      diffusion: the schedule, with latent_scale resolved to the number the UNet trained with.
      text: its text encoder (kind "none": not text-conditioned).
      sampling: the run's sampling spec, `infd sample`'s defaults for this UNet.
      autoencoder: the autoencoder export it was trained with ("" when trained on a latent cache).
    """

    kind: str
    model: Any
    step: int | None = None
    ema: bool | None = None
    diffusion: DiffusionConfig | None = None
    text: TextEncoderConfig | None = None
    sampling: SamplingSpec | None = None
    autoencoder: str = ""

    def schedule(self) -> DiffusionConfig:
        """A UNet's schedule, with the latent scale it trained with; ConfigError if not recorded."""
        if self.diffusion is None or self.diffusion.latent_scale == "auto":
            raise ConfigError(f"the {self.kind} export records no schedule with a latent scale: not a UNet export "
                              "of a training run (re-export it with python -m train.export RUN_DIR)")
        return self.diffusion

    @property
    def latent_scale(self) -> float:
        """The one place a UNet export's latent scale is read from."""
        return float(self.schedule().latent_scale)

    def to_json(self) -> dict:
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "config": to_mapping(self.model),
                "step": self.step, "ema": self.ema, "autoencoder": self.autoencoder}
        return meta | {k: None if getattr(self, k) is None else to_mapping(getattr(self, k)) for k in _SECTIONS}

    @classmethod
    def from_json(cls, meta: dict, where: str = "") -> ExportRecord:
        """The record of a config.json's contents (format 1 converted by infd.compat); ConfigError
        naming the key for anything that does not fit."""
        meta = export_meta_v2(meta, where)
        if meta["kind"] not in MODEL_KINDS:
            raise ConfigError(f"{where}kind = {meta['kind']!r}: expected one of {sorted(MODEL_KINDS)}")
        sections = {k: None if meta.get(k) is None else from_mapping(c, meta[k], prefix=f"{where}{k}.")
                    for k, c in _SECTIONS.items()}
        model = from_mapping(MODEL_KINDS[meta["kind"]][0], meta["config"], prefix=f"{where}config.")
        return cls(kind=meta["kind"], model=model, step=meta.get("step"), ema=meta.get("ema"),
                   autoencoder=meta.get("autoencoder") or "", **sections)


def save_export(model: nn.Module, record: ExportRecord, directory: str | Path) -> Path:
    """Write `directory`/model.safetensors and config.json (the record; its model config is model.cfg)."""
    if record.kind not in MODEL_KINDS:
        raise ValueError(f"export kind {record.kind!r}: expected one of {sorted(MODEL_KINDS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(replace(record, model=model.cfg).to_json(), indent=2))
    return directory


def read_record(directory: str | Path) -> ExportRecord:
    """The record of export `directory`; FileNotFoundError without config.json, ConfigError (a
    ValueError) for one that is not an export's."""
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: an export directory holds {WEIGHTS} and {CONFIG}")
    return ExportRecord.from_json(json.loads(path.read_text()), where=f"{path}: ")


def load_export(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExportRecord]:
    """(model, record): the model rebuilt from the record, model.safetensors loaded onto `device`, eval mode."""
    record = read_record(directory)
    model = MODEL_KINDS[record.kind][1](record.model)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS), device=str(device)))
    return model.to(device).eval(), record
