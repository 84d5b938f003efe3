"""The feature network of FID/pFID: images (B, 3, H, W) in [-1, 1] -> features (B, D).

kind "inception": torch-fidelity's FeatureExtractorInceptionV3, the standard FID Inception
(TF 2015-12-05 weights converted to PyTorch) that the official INFD code used for pFID
(yinboc/infd eval_pfid.py: torch_fidelity.calculate_metrics). Weights come from the torch hub
cache (`<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth`, where
torch-fidelity downloads them) or from the local path in config key `weights`.
kind "randinit": a small random-init conv net, seeded by `seed` so every rank builds the same
one. Only for offline runs: every metric name computed with it carries `_randinit`.

Both kinds share the input path: images are quantised to uint8 exactly as `infd.image.tensor_to_pil`
does (so saved PNG samples give identical features), then resized to 299x299 inside the network
with TF1-compatible bilinear interpolation, no antialiasing (torch-fidelity's
`interpolate_bilinear_2d_like_tensorflow1x`, the resize of the original TF FID and of the paper's
numbers), then mapped to [-1, 1] by (x - 128) / 128. Both plug into torchmetrics'
FrechetInceptionDistance through its custom-feature hook (`torchmetrics_fid`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from infd.config import ConfigError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
INCEPTION_DIMS = (64, 192, 768, 2048)  # torch-fidelity's feature layers; 2048 = pool3, the FID one
INPUT_SIZE = 299
RANDINIT_VERSION = 1  # bump when the random net changes: cached real statistics then miss
RANDINIT_CHANNELS = (32, 64, 128, 256)  # stride-2 3x3 convs: 299 -> 150 -> 75 -> 38 -> 19


@dataclass
class FeatureConfig:
    kind: Literal["inception", "randinit"] = "inception"
    weights: str = ""  # inception: local weights file (or its folder); "" = the torch hub cache
    dim: int = 2048  # inception: one of 64, 192, 768, 2048 (pool3, standard FID); randinit: any
    seed: int = 0  # randinit only

    def validate(self, prefix: str = "") -> None:
        if self.kind not in ("inception", "randinit"):
            raise ConfigError(f"config key '{prefix}kind' = {self.kind!r}: expected 'inception' or 'randinit'")
        if self.kind == "inception" and self.dim not in INCEPTION_DIMS:
            raise ConfigError(f"config key '{prefix}dim' = {self.dim}: the Inception gives {INCEPTION_DIMS}")
        if self.dim < 1:
            raise ConfigError(f"config key '{prefix}dim' = {self.dim}: expected a positive size")


def metric_suffix(cfg: FeatureConfig) -> str:
    """"_randinit" for the random-init net, so its numbers can never pass for real FIDs; "_d768"
    (...) for an Inception layer other than pool3 (2048), whose distance is not the standard FID."""
    if cfg.kind == "randinit":
        return "_randinit"
    return "" if cfg.dim == 2048 else f"_d{cfg.dim}"


def feature_id(cfg: FeatureConfig) -> str:
    """Names the feature network for caches of real statistics (different nets never mix)."""
    if cfg.kind == "inception":
        return f"inception-2015-12-05-d{cfg.dim}"
    return f"randinit-v{RANDINIT_VERSION}-d{cfg.dim}-s{cfg.seed}"


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 [0, 255], the values infd.image.tensor_to_pil writes
    (clamping after the affine map gives the same numbers; one buffer, in-place passes: 3x faster)."""
    return images.detach().float().add(1).mul_(127.5).clamp_(0, 255).round_().to(torch.uint8)


def resize_299(images_u8: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1], as torch-fidelity's Inception does."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images_u8.float(), size=(INPUT_SIZE, INPUT_SIZE),
                                                  align_corners=False)
    return (x - 128) / 128


class FIDFeatures(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> features (B, D) float32; `net` takes uint8 (B, 3, H, W).

    `num_features` is read by torchmetrics' FrechetInceptionDistance(feature=module).
    """

    def __init__(self, net: nn.Module, num_features: int, name: str):
        super().__init__()
        self.net, self.num_features, self.name = net, int(num_features), name
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDFeatures":
        return super().train(False)  # never leaves eval mode (torch-fidelity asserts nothing else)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        out = self.net(to_uint8(images))
        out = out[0] if isinstance(out, tuple) else out  # torch-fidelity returns one tensor per layer
        return out.reshape(images.shape[0], -1).float()


class RandInitNet(nn.Module):
    """uint8 (B, 3, H, W) -> (B, dim): 299 resize, four stride-2 3x3 convs, 1x1 conv, mean pool.

    No normalisation layer, so a sample's features do not depend on its batch. He-normal weights
    drawn from a generator seeded with `seed` (not the global RNG): the same net on every rank.
    """

    def __init__(self, dim: int, seed: int):
        super().__init__()
        layers, cin = [], 3
        for cout in RANDINIT_CHANNELS:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
            cin = cout
        layers += [nn.Conv2d(cin, dim, 1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for conv in self.body:
                if isinstance(conv, nn.Conv2d):  # He init keeps the activation scale through ReLUs
                    fan_in = conv.weight[0].numel()
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
                    conv.bias.zero_()

    def forward(self, images_u8: Tensor) -> Tensor:
        return self.body(resize_299(images_u8)).mean(dim=(2, 3))


def inception_weights_path(cfg: FeatureConfig) -> Path:
    """Where the Inception weights are read: cfg.weights (a file, or a folder holding
    INCEPTION_FILE), else torch-fidelity's download location in the torch hub cache."""
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        return path / INCEPTION_FILE if path.is_dir() else path
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _check_inception_weights(path: Path, prefix: str) -> None:
    """Fail with where to put the file; refuse anything but plain tensors (torch-fidelity itself
    unpickles with weights_only=False, so the file is opened the safe way first)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download {INCEPTION_FILE} from {INCEPTION_URL} and put "
            f"it in {Path(torch.hub.get_dir()) / 'checkpoints'}/ (the torch hub cache, where torch-fidelity looks), "
            f"or give its path as config key '{prefix}weights' (infd eval-gen: --inception-weights). Offline, set "
            f"'{prefix}kind=randinit' (infd eval-gen: --features randinit; metric names then carry _randinit).")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  pickle with code, truncated file, not a checkpoint
        raise ValueError(f"{path} is not a plain state dict of tensors ({err}); use torch-fidelity's "
                         f"{INCEPTION_FILE}") from err


def build_feature_extractor(cfg: FeatureConfig, prefix: str = "features.") -> FIDFeatures:
    """The feature network of cfg, on CPU, eval mode, no gradients (move it with .to(device)).

    prefix: the config section's dotted path, used in error messages only.
    """
    cfg.validate(prefix)
    if cfg.kind == "randinit":
        return FIDFeatures(RandInitNet(cfg.dim, cfg.seed), cfg.dim, feature_id(cfg))
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(cfg)
    _check_inception_weights(path, prefix)
    # An explicit path: torch-fidelity then never tries the network (this machine has none).
    net = FeatureExtractorInceptionV3("inception-v3-compat", [str(cfg.dim)], feature_extractor_weights_path=str(path))
    return FIDFeatures(net, cfg.dim, feature_id(cfg))


def torchmetrics_fid(extractor: FIDFeatures, **kwargs):
    """torchmetrics' FrechetInceptionDistance with our extractor through its `feature=` hook:
    update(images (B, 3, H, W) in [-1, 1], real=...) then compute(). Same for both kinds."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=extractor, **kwargs)
