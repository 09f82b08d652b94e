"""Synchronised BatchNorm for every device: ``nn.SyncBatchNorm`` on CUDA, our own on CPU/gloo.

PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors, so CPU runs with several processes use
:class:`CPUSyncBatchNorm`, which reduces per-channel sums over ranks with a differentiable all_reduce.
Each rank contributes its own element count, so ranks with different batch sizes are weighted correctly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is again an all_reduce(SUM) of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_autograd(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(x)
    return x


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over the union of all ranks' batches, with native kernels for the heavy passes.

    Forward: local per-channel sums of x and x^2 and the count, one all_reduce of them in fp64, then the
    native (eval-mode) batch_norm kernel with the global statistics. Backward: the native eval-mode kernel
    gives dy*w*invstd and the local sums of dy and dy*(x - mean); one all_reduce makes the sums global; the
    input gradient w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)) then takes three more passes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        c = x.shape[1]
        n = x.numel() // c
        # local sums in one cheap pass each (torch.var_mean is several times slower on CPU), kept in fp64
        stats = torch.cat([x.sum(dim=(0, 2, 3), dtype=torch.float64),
                           (x * x).sum(dim=(0, 2, 3), dtype=torch.float64),
                           torch.full((1,), float(n), dtype=torch.float64, device=x.device)])
        if _distributed():
            dist.all_reduce(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        mean_f, var_f = mean.to(x.dtype), var.to(x.dtype)
        y = torch.batch_norm(x, weight, bias, mean_f, var_f, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean_f, var_f)
        ctx.eps, ctx.total = eps, float(total)
        return y, mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        c = x.shape[1]
        invstd = torch.rsqrt(var + ctx.eps)
        w = weight if weight is not None else torch.ones_like(mean)
        # eval-mode native backward, one pass: dx_eval = dy * w * invstd, and the local sums
        # grad_weight = sum(dy * (x - mean)) * invstd, grad_bias = sum(dy)
        dx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        sums = torch.cat([gb, gw / invstd])  # local sum(dy), sum(dy * (x - mean))
        if _distributed():
            sums = sums.clone()
            dist.all_reduce(sums)
        mean_dy = sums[:c] / ctx.total
        mean_dy_xmu = sums[c:] / ctx.total
        wi = w * invstd
        alpha = -wi * invstd * invstd * mean_dy_xmu          # coefficient of (x - mean)
        view = (1, c, 1, 1)
        # (x - mean) is formed explicitly: alpha * x - alpha * mean would cancel when |mean| >> std
        dx = dx.sub_((wi * mean_dy).view(view)).addcmul_(x - mean.view(view), alpha.view(view))
        return dx, (gw if weight is not None else None), (gb if weight is not None else None), None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batches of all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y, mean, var, total = _SyncBatchNorm.apply(x, self.weight if self.affine else None,
                                                   self.bias if self.affine else None, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d with the synchronised one that works on ``device``."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module

