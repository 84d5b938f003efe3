"""Frozen text encoders for text-conditioned diffusion: OpenCLIP, or a diffusers folder's CLIP.

kind "openclip": `pretrained` is an OpenCLIP tag (from the usual hub cache), a local weights
file, or None for a random-init encoder: only for offline tests, and flagged by `is_random_init`.
Random init is seeded (`create_openclip`), so that training, `infd sample` and `infd eval-gen`
rebuild the same text tower from an export's config.
kind "hf_clip": `pretrained` is a diffusers folder (Stable Diffusion 1.x / 2.x: transformers'
CLIPTextModel in text_encoder/, CLIPTokenizer in tokenizer/) or its text_encoder/ folder; the
tokens are StableDiffusionPipeline.encode_prompt's. transformers is imported only then.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from infd.config import ConfigError


@dataclass
class TextEncoderConfig:
    kind: Literal["none", "openclip", "hf_clip"] = "none"
    model: str = "ViT-B-32"  # openclip only
    # openclip: tag, local file, or null = random init (tests only); hf_clip: a diffusers folder
    pretrained: str | None = "laion2b_s34b_b79k"
    caption_dropout: float = 0.1  # training: caption replaced by "" (the unconditional branch of CFG)
    # hf_clip, diffusers pipelines' clip_skip: 0 = last_hidden_state (after final_layer_norm);
    # k > 0 = the output of the k-th layer from the end, through final_layer_norm.
    clip_skip: int = 0

    def validate(self, prefix: str = "") -> None:
        if self.clip_skip < 0:
            raise ConfigError(f"config key '{prefix}clip_skip' = {self.clip_skip}: expected 0 or more")
        if self.clip_skip and self.kind != "hf_clip":
            raise ConfigError(f"config key '{prefix}clip_skip' applies to kind 'hf_clip' only (kind is {self.kind!r})")


def create_openclip(model: str, pretrained: str | None, seed: int = 0):
    """open_clip.create_model; random init (pretrained None) from `seed` on a forked RNG: the same
    weights in every process and every run, and the caller's RNG left as it was."""
    import open_clip

    if pretrained is not None:
        return open_clip.create_model(model, pretrained=pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(model, pretrained=None)


class FrozenOpenCLIPText(nn.Module):
    """captions -> per-token features (B, 77, width) after the final LayerNorm, no gradient."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        import open_clip

        try:
            clip = create_openclip(cfg.model, cfg.pretrained)
        except Exception as err:  # noqa: BLE001  offline hub, bad tag or path: say which knob to turn
            raise RuntimeError(f"could not load OpenCLIP {cfg.model} weights {cfg.pretrained!r} ({err}); put them "
                               "in the hub cache, give a local file as text.pretrained, or set text.pretrained=null "
                               "for a random-init encoder (tests only)") from err
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
        self.transformer, self.ln_final = clip.transformer, clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.width = clip.token_embedding.embedding_dim
        self.is_random_init = cfg.pretrained is None
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        device = self.token_embedding.weight.device
        tokens = self.tokenizer(captions).to(device)
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)


def hf_clip_folders(pretrained: str | None) -> tuple[Path, Path]:
    """(text_encoder folder, tokenizer folder) of a diffusers root or its text_encoder/ folder."""
    path = Path(pretrained or "")
    if pretrained and (path / "text_encoder" / "config.json").is_file():
        encoder, tokenizer = path / "text_encoder", path / "tokenizer"
    elif pretrained and (path / "config.json").is_file():
        encoder, tokenizer = path, path.parent / "tokenizer"
    else:
        raise ConfigError(f"config key 'text.pretrained' = {pretrained!r}: kind 'hf_clip' needs a diffusers folder "
                          "with text_encoder/ and tokenizer/ (e.g. a Stable Diffusion folder), or its text_encoder/")
    if not tokenizer.is_dir():
        raise ConfigError(f"config key 'text.pretrained' = {pretrained!r}: no tokenizer folder {tokenizer} "
                          "beside the text encoder")
    return encoder, tokenizer


class FrozenHFCLIPText(nn.Module):
    """captions -> tokens (B, 77, width) of transformers' CLIPTextModel, exactly as
    StableDiffusionPipeline.encode_prompt (padding to model_max_length, truncation; clip_skip),
    frozen, no gradient. The unconditional tokens are those of "" (the pipeline's default)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        encoder_dir, tokenizer_dir = hf_clip_folders(cfg.pretrained)
        try:
            # float32 whatever the file holds, as diffusers' pipelines load it by default
            self.text_encoder = CLIPTextModel.from_pretrained(encoder_dir, local_files_only=True, dtype=torch.float32)
            self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except OSError as err:  # incomplete folder: say which knob to turn
            raise ConfigError(f"config key 'text.pretrained' = {cfg.pretrained!r}: could not load the CLIP text "
                              f"encoder / tokenizer ({err})") from err
        layers = self.text_encoder.config.num_hidden_layers
        if cfg.clip_skip >= layers:
            raise ConfigError(f"config key 'text.clip_skip' = {cfg.clip_skip}: the text encoder has {layers} layers")
        self.clip_skip = cfg.clip_skip
        self.width = self.text_encoder.config.hidden_size
        self.is_random_init = False
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        device = self.text_encoder.device
        inputs = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        # SD's CLIP uses no mask (padding is attended); some diffusers text encoders ask for one
        mask = inputs.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) \
            else None
        ids = inputs.input_ids.to(device)
        if not self.clip_skip:
            return self.text_encoder(ids, attention_mask=mask)[0]
        hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # transformers 5 flattened CLIPTextModel (no .text_model); 4.x nests it there
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(hidden[-(self.clip_skip + 1)])


def build_text_encoder(cfg: TextEncoderConfig) -> FrozenOpenCLIPText | FrozenHFCLIPText | None:
    if cfg.kind == "hf_clip":
        return FrozenHFCLIPText(cfg)
    return FrozenOpenCLIPText(cfg) if cfg.kind == "openclip" else None
