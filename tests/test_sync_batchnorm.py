"""SyncBatchNorm2d: 2 gloo processes with one image each equal 1 process with both images."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from infd.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from infd.models.sync_batchnorm import SyncBatchNorm2d, synchronise_batchnorm

WORLD = 2


def _batch() -> torch.Tensor:
    """The fixed 2-image batch (2, 3, 64, 64)."""
    return torch.randn(WORLD, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _disc(norm: str) -> PatchDiscriminator:
    torch.manual_seed(0)
    return PatchDiscriminator(DiscriminatorConfig(ndf=8, n_layers=3, norm=norm))


def _step(d: nn.Module, x: torch.Tensor, average_grads: bool) -> dict:
    """Forward, loss = mean logit, backward; logits, input grad, parameter grads and BN buffers."""
    x = x.clone().requires_grad_(True)
    out = d(x)
    # Each rank's loss is its mean logit; with equal shards, the mean of the per-rank losses is the
    # 1-process mean over the 2 images, and averaging parameter grads gives its gradient (as DDP).
    out.mean().backward()
    grads = {k: p.grad.clone() for k, p in d.named_parameters()}
    if average_grads:
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    buffers = {k: b.clone() for k, b in d.named_buffers() if "running" in k}
    return {"out": out.detach(), "x_grad": x.grad, "grads": grads, "buffers": buffers}


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    x = _batch()[rank:rank + 1]
    result = {norm: _step(_disc(norm), x, average_grads=True) for norm in ("sync_batch", "batch")}
    torch.save(result, f"{path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of the 2-process gloo run, one entry per rank."""
    path = str(tmp_path_factory.mktemp("syncbn") / "result")
    mp.start_processes(_worker, args=(_free_port(), path), nprocs=WORLD, start_method="spawn")
    return [torch.load(f"{path}.{r}", weights_only=True) for r in range(WORLD)]


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{msg}: {m}")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_batchnorm(two_ranks):
    ref = _step(_disc("batch"), _batch(), average_grads=False)
    for rank, res in enumerate(two_ranks):
        sync = res["sync_batch"]
        _close(sync["out"], ref["out"][rank:rank + 1], "logits")
        # rank r's input grad is d(sum of per-rank losses)/dx_r = WORLD * d(1-process mean loss)/dx_r
        scale = ref["x_grad"].abs().max()  # input grads are about 1e-3: compare them relative to that
        _close(sync["x_grad"] / WORLD / scale, ref["x_grad"][rank:rank + 1] / scale, "input grad")
        for k in ref["grads"]:
            _close(sync["grads"][k], ref["grads"][k], k)
        assert sync["buffers"].keys() == ref["buffers"].keys() and len(ref["buffers"]) == 6
        for k in ref["buffers"]:
            _close(sync["buffers"][k], ref["buffers"][k], k)


def test_per_rank_batchnorm_differs_from_the_global_batch(two_ranks):
    ref = _step(_disc("batch"), _batch(), average_grads=False)
    for rank, res in enumerate(two_ranks):
        assert not torch.allclose(res["batch"]["out"], ref["out"][rank:rank + 1], atol=1e-3)
        # the variance each step saw: running_var = 0.9 * 1 + 0.1 * var after one step
        var_rank, var_ref = ((r["buffers"]["net.3.running_var"] - 0.9) / 0.1 for r in (res["batch"], ref))
        assert not torch.allclose(var_rank, var_ref, rtol=1e-2)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_and_in_eval_it_is_batchnorm(momentum):
    bn = nn.BatchNorm2d(5, momentum=momentum)
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    sync = synchronise_batchnorm(nn.Sequential(bn))[0]
    ref = nn.BatchNorm2d(5, momentum=momentum)
    ref.load_state_dict(sync.state_dict())
    assert isinstance(sync, SyncBatchNorm2d) and sync.weight is bn.weight and sync.momentum == momentum
    for _ in range(2):
        x = torch.randn(3, 5, 4, 4)
        torch.testing.assert_close(sync(x), ref(x), atol=0, rtol=0)  # world size 1: plain batch norm
    torch.testing.assert_close(sync.state_dict(), ref.state_dict(), atol=0, rtol=0)
    sync.eval(), ref.eval()
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(sync(x), ref(x), atol=0, rtol=0)


def test_sync_batch_discriminator_has_the_batch_state_dict_keys():
    sync, batch = _disc("sync_batch"), _disc("batch")
    assert list(sync.state_dict()) == list(batch.state_dict())
    assert sum(isinstance(m, SyncBatchNorm2d) for m in sync.modules()) == 3
    assert not any(isinstance(m, SyncBatchNorm2d) for m in batch.modules())
    batch.load_state_dict(sync.state_dict())  # checkpoints and exports load across the two kinds
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(sync(x), batch(x))  # no process group here: same maths
