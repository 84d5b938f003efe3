"""Stable Diffusion's UNet (diffusers' UNet2DConditionModel) behind our UNet's call signature.

A UNetConfig of kind "diffusers" names a diffusers folder (`pretrained`) or records the
UNet2DConditionModel config itself (`diffusers_config`), so an export rebuilds it without the
folder. diffusers is imported inside functions: it is only needed by those who use SD.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from infd.config import ConfigError
from infd.convert.stable_diffusion import read_json, sd_folders
from infd.models.lowres_cond import LevelEmbedding, check_lowres, widen_conv_in, widen_weight
from infd.models.unet import UNetConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def unet_folder(pretrained: str, key: str = "unet.pretrained") -> Path:
    """The folder with the UNet's config.json and weights: root/unet, or `pretrained` itself."""
    return sd_folders(pretrained, key)[1]


def check_unet_config(dc: dict, where: str) -> None:
    """ConfigError for a diffusers UNet our model_fn(x, t, context) cannot drive."""
    if dc.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConfigError(f"{where}: {dc['_class_name']} is not a UNet2DConditionModel")
    for key in ("class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim_type",
                "time_cond_proj_dim"):  # SDXL, upscalers, LCM: inputs beyond (x, t, text tokens)
        if dc.get(key) is not None:
            raise ConfigError(f"{where}: {key} = {dc[key]!r} needs conditioning inputs beyond (x, t, text tokens); "
                              "only SD 1.x / 2.x style UNets are supported")
    out_ch = dc.get("out_channels", dc.get("in_channels", 4))
    if dc.get("in_channels", 4) != out_ch:
        raise ConfigError(f"{where}: in_channels {dc.get('in_channels')} != out_channels {out_ch} "
                          "(inpainting-style UNets take extra inputs)")
    if not isinstance(dc.get("cross_attention_dim", 1280), int):
        raise ConfigError(f"{where}: cross_attention_dim {dc['cross_attention_dim']!r}: expected one width")


def fill_unet_config(cfg: UNetConfig) -> UNetConfig:
    """cfg (kind=diffusers) with diffusers_config read from cfg.pretrained when empty, and
    in_channels / context_dim taken from it (in_channels, cross_attention_dim)."""
    if cfg.diffusers_config:
        dc, where = json.loads(json.dumps(dict(cfg.diffusers_config))), "config key 'unet.diffusers_config'"
    elif cfg.pretrained:
        folder = unet_folder(cfg.pretrained)
        dc, where = read_json(folder / "config.json", "unet.pretrained"), str(folder / "config.json")
    else:
        raise ConfigError("unet.kind=diffusers needs 'unet.pretrained' (a diffusers folder) or "
                          "'unet.diffusers_config' (a UNet2DConditionModel config)")
    check_unet_config(dc, where)
    return replace(cfg, diffusers_config=dc, in_channels=int(dc.get("in_channels", 4)),
                   context_dim=int(dc.get("cross_attention_dim", 1280)))


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel (self.unet) behind our UNet's call signature.

    forward(x (B, C, h, w), t (B,), context (B, L, D), labels=None) -> (B, C, h, w): the
    network output in the schedule's parameterisation (eps or v), as UNet's.
    cfg: UNetConfig (kind=diffusers) with diffusers_config, in_channels, context_dim filled.
    """

    def __init__(self, cfg: UNetConfig, empty: bool = False):
        """empty: parameters on the meta device (no random init: weights are loaded next)."""
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.cfg = cfg if cfg.diffusers_config else fill_unet_config(cfg)
        with torch.device("meta") if empty else contextlib.nullcontext():
            self.unet = UNet2DConditionModel.from_config(self.cfg.diffusers_config)
            if self.cfg.lowres_channels:  # zero input channels (loaded weights are widened to fit)
                self.unet.conv_in = widen_conv_in(self.unet.conv_in, self.cfg.lowres_channels)
        self.level_emb, self._level = None, None
        if self.cfg.lowres_channels:  # not a diffusers weight: made here, zero, on the CPU
            proj = self.unet.time_embedding.linear_1
            self.level_emb = LevelEmbedding(proj.in_features, self.unet.time_embedding.linear_2.out_features)
            self.unet.time_embedding.register_forward_hook(self._add_level)
        if self.cfg.grad_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def _add_level(self, module, inputs, emb: Tensor) -> Tensor:
        """The time embedding plus the noise level's (a hook: diffusers' forward has no input for it)."""
        return emb + self._level.to(emb.dtype) if self._level is not None else emb

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, labels: Tensor | None = None,
                lowres: Tensor | None = None, level: Tensor | None = None) -> Tensor:
        if labels is not None:
            raise ValueError("a diffusers UNet2DConditionModel takes no class labels (labels must be None)")
        if context is None:  # diffusers would fail deep inside cross-attention
            raise ValueError("a Stable Diffusion UNet needs text tokens as context (B, L, "
                             f"{self.cfg.context_dim}); its unconditional input is the empty prompt's tokens")
        if self.level_emb is None:
            if lowres is not None:
                raise ValueError("this UNet takes no low-resolution condition (unet.lowres_channels is 0)")
            return self.unet(x, t, encoder_hidden_states=context).sample
        x = torch.cat([x, check_lowres(lowres, x, self.cfg.lowres_channels)], dim=1)
        self._level = self.level_emb(level if level is not None else torch.zeros(x.shape[0], device=x.device))
        try:
            return self.unet(x, t, encoder_hidden_states=context).sample
        finally:
            self._level = None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder (one file, or the shards of an index)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    raise ConfigError(f"unet.pretrained: no {WEIGHT_FILES[0]} in {folder}"
                      + (f" ({pickled} found: only safetensors are loaded, never pickles; convert them)"
                         if pickled else ""))


def load_unet_weights(model: DiffusersUNet, folder: Path) -> None:
    """Load `folder`'s safetensors into model.unet, strictly (float weights as float32, as
    diffusers' from_pretrained does by default); ConfigError listing missing/unexpected keys."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        state.update(load_file(str(path)))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    wide = model.unet.conv_in.in_channels
    if model.cfg.lowres_channels and state["conv_in.weight"].shape[1] < wide:  # a UNet without the condition
        state["conv_in.weight"] = widen_weight(state["conv_in.weight"], wide)
    missing, unexpected = model.unet.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"unet.pretrained: the weights in {folder} do not fit its config.json: "
                          f"missing keys {sorted(missing)[:20]}, unexpected keys {sorted(unexpected)[:20]}"
                          f" ({len(missing)} missing, {len(unexpected)} unexpected in all)")
    empty = [n for n, p in chain(model.unet.named_parameters(), model.unet.named_buffers()) if p.is_meta]
    if empty:
        raise RuntimeError(f"tensors left without weights after loading {folder}: {empty[:10]}")


def build_diffusers_unet(cfg: UNetConfig, load_pretrained: bool = False) -> DiffusersUNet:
    """DiffusersUNet of cfg (kind=diffusers); its weights from cfg.pretrained when load_pretrained,
    else random init (e.g. to load an export's state dict into)."""
    cfg = fill_unet_config(cfg)
    if load_pretrained and not cfg.pretrained:
        raise ConfigError("loading pretrained UNet weights needs 'unet.pretrained' (a diffusers folder)")
    model = DiffusersUNet(cfg, empty=load_pretrained)
    if load_pretrained:
        load_unet_weights(model, unet_folder(cfg.pretrained))
    return model
