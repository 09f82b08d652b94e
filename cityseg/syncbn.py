"""Synchronised BatchNorm for every device: ``nn.SyncBatchNorm`` on CUDA, our own on CPU/gloo.

PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors, so CPU runs use :class:`CPUSyncBatchNorm`, which sums
per-channel statistics over the ranks of a process group in its forward and the matching gradient sums in its
backward. Each rank contributes its own element count, so ranks with different batch sizes are weighted
correctly. The sums travel over a gloo group (the trainer gives BatchNorm a group of its own, so that its small
sums do not queue behind DDP's gradient buckets). CPU runs of one process use it too, with nothing to sum: on
channels_last maps it keeps the accuracy of PyTorch's NCHW kernel, which PyTorch's channels_last CPU kernel does
not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


def _world(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of a small tensor over the ranks of ``group``, added in rank order, so every rank gets the same
    bits. A failed or timed-out collective (a peer that died or hangs) raises instead of waiting forever."""
    parts = [torch.empty_like(t) for _ in range(_world(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts).sum(dim=0)


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over the union of all ranks' batches, built from native CPU kernels.

    Everything is computed on ``xc = x - local mean`` (fp32), which is kept for the backward instead of ``x``:
    BatchNorm depends on ``x`` only through ``x - mean``, and with the large common offset gone nothing
    cancels, however far the mean is from zero.

    Forward: per-channel local count, mean and sum of ``xc^2`` (fp32 sums, pairwise and fast on CPU), one
    fp64 sum over ranks of ``[n*mean, M2 + n*mean^2, n]``, then the native eval-mode kernel with the global
    statistics. Backward: the eval-mode kernel given the global statistics yields the local ``sum(dy)`` and
    ``sum(dy * xhat)`` in one pass; one sum over ranks gives their global means, and dx, an affine function of
    ``dy`` and ``xc`` per channel, takes two more passes (five reads and two writes of the activation in all,
    where the native training-mode backward plus a correction took seven and three).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):  # type: ignore[override]
        c = x.shape[1]
        n = x.numel() // c
        view = (1, c, 1, 1)
        xf = x.float()  # statistics in fp32 also under bf16/fp16 autocast (a no-op for fp32 input)
        mean_l = xf.sum(dim=(0, 2, 3)) / n
        xc = xf - mean_l.view(view)
        m2 = (xc * xc).sum(dim=(0, 2, 3))
        mean_l64 = mean_l.double()
        stats = torch.cat([mean_l64 * n, m2.double() + n * mean_l64 * mean_l64,
                           torch.full((1,), float(n), dtype=torch.float64, device=x.device)])
        if _world(group) > 1:
            stats = rank_sum(stats, group)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        shift, var32 = (mean - mean_l64).float(), var.float()  # shift: the global mean in xc's coordinates
        y = torch.batch_norm(xc, weight, bias, shift, var32, False, 0.0, eps, False)
        ctx.save_for_backward(xc, weight, shift, var32)
        ctx.eps, ctx.total, ctx.dtype, ctx.group = eps, float(total), x.dtype, group
        return y.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):  # type: ignore[override]
        xc, weight, shift, var = ctx.saved_tensors
        c = xc.shape[1]
        dy = dy.float()
        invstd = torch.rsqrt(var + ctx.eps)
        w = weight.float() if weight is not None else torch.ones_like(shift)
        # The local gw = sum(dy * xhat) and gb = sum(dy), xhat = (xc - shift) * invstd: what the eval-mode
        # kernel computes when given the global statistics as running ones, in one pass and without a dx.
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dy, xc, w, shift, var, None, None, False, ctx.eps, [False, True, True])
        sums = torch.cat([gb, gw]).double()
        if _world(ctx.group) > 1:
            sums = rank_sum(sums, ctx.group)
        mean_dy, mean_dy_xhat = (sums / ctx.total).float().split(c)
        # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = a * dy + b * xc + b0 per channel:
        # b * xc + b0 by the eval-mode kernel (zero mean, unit variance, no eps), then a * dy added in place.
        a = w * invstd
        b = -a * invstd * mean_dy_xhat
        b0 = -a * mean_dy - b * shift
        dx = torch.batch_norm(xc, b, b0, torch.zeros_like(b), torch.ones_like(b), False, 0.0, 0.0, False)
        dx.addcmul_(dy, a.view(1, c, 1, 1))
        if weight is None:
            return dx.to(ctx.dtype), None, None, None, None
        return dx.to(ctx.dtype), gw.to(weight.dtype), gb.to(weight.dtype), None, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batches of all ranks of ``process_group``
    (the default group when None), like ``nn.SyncBatchNorm``; the group must be a gloo one."""

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self._train_forward(x)

    # Run eagerly under torch.compile: its fused reductions over a channels_last map took the statistics
    # with errors of about 2% of the gradients in a tiny U-Net, against 7e-5 eagerly.
    @torch.compiler.disable
    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        y, mean, var, total = _SyncBatchNorm.apply(x, self.weight if self.affine else None,
                                                   self.bias if self.affine else None, self.eps,
                                                   self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm2d with the synchronised one that works on ``device``, over ``process_group``."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, group: Any) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group=group)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child, group))
    return module
