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


# The longest files as measured alone (seconds on 2 cores, 2026-12): started first. Any other file
# follows in order of its count of `slow` tests. A scheduling hint only: no test depends on order.
LONGEST_FIRST = ("test_real_slurm.py", "test_train_autoencoder.py", "test_train_diffusion.py", "test_multinode.py",
                 "test_preemption.py", "test_train_from_sd.py")


def pytest_collection_modifyitems(items):
    """Long files first (their test order kept): make test's workers take one file at a time in this
    order, so the long files start early instead of running alone at the end (longest-first)."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.fspath.strpath] = slow.get(item.fspath.strpath, 0) + (item.get_closest_marker("slow") is not None)

    def rank(path: str) -> tuple[int, int]:
        name = path.rsplit("/", 1)[-1]
        return (LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST), -slow[path])

    first_seen = {path: i for i, path in reversed(list(enumerate(item.fspath.strpath for item in items)))}
    items.sort(key=lambda item: (*rank(item.fspath.strpath), first_seen[item.fspath.strpath]))
