"""LPIPS with a VGG16 backbone (Zhang et al., CVPR 2018): our module, the lpips package's calibrated heads.

distance(a, b) for images in [-1, 1]: shift and scale both to ImageNet statistics, take VGG16's relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 maps, unit-normalise each over channels, square their difference,
weight the channels by the layer's learnt non-negative 1x1 head, average over space and sum over layers.
The heads are the lpips package's file (`weights/v0.1/vgg.pth`, read without importing the package, which
imports torchvision's model zoo); the backbone is torchvision's ImageNet VGG16 (`features.*` keys of its
state dict). Building the backbone ourselves skips VGG16's 124M-parameter classifier, which LPIPS never
uses and whose construction took about a second at every training start.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

# VGG16's convolutions (output channels) and 2x2 max pools ("M"), in torchvision's `features` order.
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # ImageNet mean and std, expressed for inputs in [-1, 1]
SCALE = (0.458, 0.448, 0.450)


CLASSIFIER = ((25088, 4096), (4096, 4096), (4096, 1000))  # VGG16's linear layers (in, out)


def vgg16_features(random_init: bool) -> nn.Sequential:
    """torchvision's vgg16().features up to relu5_3. random_init: its init too (Kaiming normal, fan out; zero
    bias), after drawing and discarding what torchvision's constructor draws for the classifier in between,
    so that under a seed the random features are torchvision's exactly (tested) without its 0.5 GB classifier."""
    layers, convs, channels = [], [], 3
    for item in VGG16_FEATURES:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        convs.append(nn.Conv2d(channels, item, 3, padding=1))
        layers += [convs[-1], nn.ReLU(inplace=True)]
        channels = item
    if random_init:
        _skip_uniform_draws(sum(n_in * n_out + n_out for n_in, n_out in CLASSIFIER))
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return nn.Sequential(*layers)


def _skip_uniform_draws(count: int, chunk: int = 1 << 22) -> None:
    """Advance torch's default generator as `count` uniform_ draws do (one per element), in small pieces."""
    buffer = torch.empty(min(count, chunk))
    while count > 0:
        buffer[:min(count, chunk)].uniform_()
        count -= chunk


def heads_file() -> Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS' calibrated heads come with the lpips package: pip install lpips")
    return Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth"


class LPIPS(nn.Module):
    """forward(a, b): (B, 3, H, W) each, in [-1, 1] -> (B, 1, 1, 1) distances. Frozen, in eval mode."""

    def __init__(self, is_random_init: bool):
        super().__init__()
        self.features = vgg16_features(random_init=is_random_init)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.is_random_init = is_random_init
        heads = torch.load(heads_file(), map_location="cpu", weights_only=True)
        for i, head in enumerate(self.heads):
            head.weight.data.copy_(heads[f"lin{i}.model.1.weight"])
        self.requires_grad_(False)
        self.eval()

    def load_vgg16(self, state: dict[str, Tensor]) -> None:
        """torchvision's VGG16 state dict (its `features.*` entries; the classifier is ignored)."""
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(features)

    def taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        taps_a = self.taps((a - self.shift) / self.scale)
        taps_b = self.taps((b - self.shift) / self.scale)
        total = 0
        for head, fa, fb in zip(self.heads, taps_a, taps_b):
            diff = (_unit(fa) - _unit(fb)) ** 2
            total = total + head(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
