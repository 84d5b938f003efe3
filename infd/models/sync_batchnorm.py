"""BatchNorm2d whose training statistics span the global batch (all ranks), on any backend.

Why our own: `torch.nn.SyncBatchNorm` only accepts CUDA tensors, so a CPU run on gloo (tests, CPU
training) cannot use it. `SyncBatchNorm2d` does the same with plain `torch.distributed.all_reduce`
calls, which work on gloo (CPU) and nccl (CUDA) alike: one all-reduce of the per-channel
(sum, sum of squares, count) in forward, one of (sum grad_out, sum grad_out * x_hat) in backward.
Every rank must therefore call forward and backward the same number of times (collectives).
Where the parameters already live on CUDA, `synchronise_batchnorm` uses torch's own (faster) kernel.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

_DIMS = (0, 2, 3)  # reduce over batch and space: per-channel statistics of (B, C, H, W)


def _world_size() -> int:
    """World size of the default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _SyncBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm over the global batch. x (B, C, H, W); weight, bias (C,) or None."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics at least in float32
        xf = x.to(acc)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=acc, device=x.device)
        stats = torch.cat([xf.sum(_DIMS), (xf * xf).sum(_DIMS), count])
        dist.all_reduce(stats)
        c, n = x.shape[1], stats[-1]  # not checked (a host sync): > 1 unless ranks feed empty batches
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased: used to normalise
        invstd = torch.rsqrt(var + eps)
        x_hat = (xf - mean[:, None, None]) * invstd[:, None, None]
        y = x_hat if weight is None else x_hat * weight.to(acc)[:, None, None] + bias.to(acc)[:, None, None]
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.n, ctx.x_dtype = n, x.dtype
        unbiased = var * (n / (n - 1))  # running_var takes the unbiased variance, as in torch
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean, _grad_var):
        x_hat, invstd, weight = ctx.saved_tensors
        g = grad_y.to(x_hat.dtype)
        sum_g, sum_gx = g.sum(_DIMS), (g * x_hat).sum(_DIMS)  # local: the parameter gradients
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_g, sum_gx])
            dist.all_reduce(both)  # the mean over the global batch couples every rank's inputs
            c = sum_g.numel()
            mean_g, mean_gx = both[:c] / ctx.n, both[c:] / ctx.n
            scale = (invstd if weight is None else invstd * weight.to(invstd.dtype))[:, None, None]
            grad_x = scale * (g - mean_g[:, None, None] - x_hat * mean_gx[:, None, None])
            grad_x = grad_x.to(ctx.x_dtype)
        if weight is not None:
            grad_w = sum_gx.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = sum_g.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers, state_dict keys) with statistics over all ranks.

    (B, C, H, W) -> (B, C, H, W). In training mode with a default process group of world size > 1,
    normalises with the global mean and biased variance and moves running_mean / running_var towards
    the global mean and unbiased variance. Otherwise (eval, no group, one rank) plain batch norm.
    """

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or _world_size() == 1:
            return super().forward(x)
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum None = cumulative moving average, as in torch
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y, mean, var = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(var.to(self.running_var.dtype), factor)
        return y


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d in `module` (itself included) by a synchronised one; returns the result.

    Parameters on CUDA: torch's nn.SyncBatchNorm (nccl kernel; it converts every batch norm).
    Otherwise SyncBatchNorm2d, sharing the original parameters and buffers (same state_dict keys,
    eps, momentum, affine, track_running_stats, train/eval mode). Idempotent on SyncBatchNorm2d.
    """
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, synchronise_batchnorm(child))
    return module
