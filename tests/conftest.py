import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lpips_randinit():
    """LPIPS with a random-init VGG backbone: offline, only for plumbing tests, never a metric."""
    from infd.losses import build_lpips

    return build_lpips("random")
