import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
# Every process of the suite sees this environment's tools first, as in an activated venv. DeepSpeed
# JIT-builds its CPU shared-memory op with whichever `ninja` is on PATH; two ninja versions (the venv's
# and a system one) hash the same build differently, so processes alternating between them rebuilt it
# each time (20-40 s, under a lock every DeepSpeed start waits on). The build cache lives in the venv:
# checkouts with other venvs do not overwrite each other's build either.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parents[1] / "torch_extensions"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def lpips_randinit():
    """LPIPS with a random-init VGG backbone: offline, only for plumbing tests, never a metric."""
    from infd.losses import build_lpips

    return build_lpips("random")


@pytest.fixture(autouse=True)
def _shard_cache(monkeypatch, tmp_path):
    """The node shard cache (read_mode auto on S3) of each test in its own folder, never in ~/.cache."""
    monkeypatch.setenv("INFD_SHARD_CACHE", str(tmp_path / "shard_cache"))
