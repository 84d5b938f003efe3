"""Frozen OpenCLIP text encoder for text-conditioned diffusion.

`pretrained` is an OpenCLIP tag (from the usual hub cache), a local weights file, or None for a
random-init encoder: only for offline tests, and flagged by `is_random_init`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass
class TextEncoderConfig:
    kind: Literal["none", "openclip"] = "none"
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"  # tag, local file, or null = random init (tests only)
    caption_dropout: float = 0.1  # training: caption replaced by "" (the unconditional branch of CFG)


class FrozenOpenCLIPText(nn.Module):
    """captions -> per-token features (B, 77, width) after the final LayerNorm, no gradient."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        import open_clip

        try:
            clip = open_clip.create_model(cfg.model, pretrained=cfg.pretrained)
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


def build_text_encoder(cfg: TextEncoderConfig) -> FrozenOpenCLIPText | None:
    return FrozenOpenCLIPText(cfg) if cfg.kind == "openclip" else None
