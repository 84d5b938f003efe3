"""CLIP score of images against their prompts, with an OpenCLIP model.

    clip_score(I, C) = 100 * max(cos(E_I, E_C), 0)        per (image, prompt) pair

the definition in torchmetrics' docstring (CLIPScore, after Hessel et al. 2021 with w = 100).
Note: torchmetrics' implementation clamps the batch mean, max(mean(100 cos), 0), not each pair;
the two agree whenever every cosine is positive (the case for real CLIP models on image-caption
pairs). Report the mean of our per-pair scores.

`pretrained` is an OpenCLIP tag (the usual hub cache), a local weights file, or None for a
random-init model seeded by `seed` (offline only: the metric name then carries `_randinit`; at seed 0
its text tower is the random-init text encoder of the same model, infd.text.create_openclip).
Images are preprocessed by OpenCLIP's own eval transform for the model (resize of the short side
to the model's image size with its interpolation, centre crop, its mean/std), applied to the
8-bit image, as for a saved sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from infd.config import ConfigError
from infd.image import tensor_to_pil


@dataclass
class ClipScoreConfig:
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"  # tag, local file, or null = random init (offline only)
    seed: int = 0  # random init only: every rank builds the same model


def clip_suffix(cfg: ClipScoreConfig) -> str:
    """"_randinit" when the CLIP model has random weights."""
    return "_randinit" if cfg.pretrained is None else ""


def clip_metric_name(cfg: ClipScoreConfig) -> str:
    return "clip_score" + clip_suffix(cfg)


def _create_model(cfg: ClipScoreConfig, prefix: str):
    from infd.text import create_openclip

    try:
        return create_openclip(cfg.model, cfg.pretrained, cfg.seed)
    except Exception as err:  # noqa: BLE001  offline hub, bad tag or path: say which knob to turn
        raise ConfigError(f"could not load OpenCLIP {cfg.model} weights {cfg.pretrained!r} ({err}); put them in "
                           f"the hub cache, give a local file as config key '{prefix}pretrained' (infd eval-gen: "
                           "--clip-pretrained), or set it to null (--clip-pretrained none) for a random-init model "
                           "(offline only; the metric becomes clip_score_randinit)"
                           ) from err


class ClipScorer(nn.Module):
    """(images (B, 3, H, W) in [-1, 1], prompts: B strings) -> CLIP score (B,) in [0, 100]."""

    def __init__(self, cfg: ClipScoreConfig, prefix: str = "clip."):
        super().__init__()
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.cfg = cfg
        self.model = _create_model(cfg, prefix)
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        self.transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        size = pp["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.register_buffer("mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ClipScorer":
        return super().train(False)  # a metric: dropout never on

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, s, s) normalised model input, s = the model's size."""
        return torch.stack([self.transform(tensor_to_pil(x)) for x in images])

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B, 3, H, W), B prompts -> cos(E_I, E_C) (B,) float32, per pair."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        img = self.model.encode_image(self.preprocess(images).to(device), normalize=True)
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(device), normalize=True)
        return (img.float() * txt.float()).sum(dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        """(B, 3, s, s) in [-1, 1] at the model's input size s -> unit embeddings (B, D), differentiable
        (guided sampling: the image is rendered at s, so only the mean/std normalisation is applied)."""
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.model.encode_image(x, normalize=True)

    def embed_texts(self, prompts: list[str]) -> Tensor:
        """Unit text embeddings (B, D)."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(prompts)).to(device), normalize=True)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return 100 * self.cosine(images, prompts).clamp(min=0)


def clip_score(scorer: ClipScorer, images: Tensor, prompts: list[str]) -> Tensor:
    """Per-pair CLIP score (B,) = 100 * max(cos(image emb, prompt emb), 0); average it for the metric."""
    return scorer(images, prompts)
