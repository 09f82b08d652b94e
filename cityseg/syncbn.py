"""Synchronised BatchNorm for every device: ``nn.SyncBatchNorm`` on CUDA, our own on CPU/gloo.

PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors, so CPU runs use :class:`CPUSyncBatchNorm`, which sums
per-channel statistics over the ranks of a process group in its forward and the matching gradient sums in its
backward. Each rank contributes its own element count, so ranks with different batch sizes are weighted
correctly. The sums travel through shared memory where all ranks are on one host (:mod:`cityseg.shm`), by gloo
otherwise. CPU runs of one process use it too, with nothing to sum: on channels_last maps it keeps the accuracy
of PyTorch's NCHW kernel, which PyTorch's channels_last CPU kernel does not.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .shm import shared_memory_sum

RankSum = Callable[[torch.Tensor], torch.Tensor]  # the sum of a small tensor over ranks, in rank order


def _world(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class GlooSum:
    """``summer(t)``: the sum of a small tensor over the ranks of ``group``, added in rank order (the same bits
    on every rank), by gloo.

    An all_gather rather than an all_reduce: for a few hundred bytes gloo's all_reduce takes about 1.6 ms
    on the 2-core CI machine and its all_gather 0.4 ms, and BatchNorm synchronises twice per layer and step.
    The wait polls and yields instead of blocking: a blocked rank lets its core go idle, and waking an idle
    virtual CPU again can take milliseconds; yielding still gives the core to any thread that can run.
    """

    def __init__(self, group: Any = None):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(_world(self.group))]
        work = dist.all_gather(parts, t.contiguous(), group=self.group, async_op=True)
        while not work.is_completed():
            os.sched_yield()
        work.wait()  # raises if the collective failed
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
    def forward(ctx, x, weight, bias, eps, rank_sum):  # type: ignore[override]
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
        if rank_sum is not None:
            stats = rank_sum(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        shift, var32 = (mean - mean_l64).float(), var.float()  # shift: the global mean in xc's coordinates
        y = torch.batch_norm(xc, weight, bias, shift, var32, False, 0.0, eps, False)
        ctx.save_for_backward(xc, weight, shift, var32)
        ctx.eps, ctx.total, ctx.dtype, ctx.rank_sum = eps, float(total), x.dtype, rank_sum
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
        if ctx.rank_sum is not None:
            sums = ctx.rank_sum(sums)
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
    (the default group when None), like ``nn.SyncBatchNorm``.

    ``rank_sum`` is how the sums travel: gloo when None; :func:`convert_sync_batchnorm` gives all the layers
    one shared-memory channel where it can.
    """

    def __init__(self, *args: Any, process_group: Any = None, rank_sum: RankSum | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self.rank_sum = rank_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self._train_forward(x)

    # Run eagerly under torch.compile: its fused reductions over a channels_last map took the statistics
    # with errors of about 2% of the gradients in a tiny U-Net, against 7e-5 eagerly.
    @torch.compiler.disable
    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank_sum is None and _world(self.process_group) > 1:
            self.rank_sum = GlooSum(self.process_group)
        y, mean, var, total = _SyncBatchNorm.apply(x, self.weight if self.affine else None,
                                                   self.bias if self.affine else None, self.eps, self.rank_sum)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group: Any = None,
                           shared_memory: bool = True) -> nn.Module:
    """Replace every BatchNorm2d with the synchronised one that works on ``device``, over ``process_group``.

    On CPU inside a process group this is collective (every rank calls it): with ``shared_memory`` the ranks
    try to set up one shared-memory channel for all the layers' sums, and use gloo if they share no memory.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    rank_sum: RankSum | None = None
    if _world(process_group) > 1:
        widest = max((m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d)), default=0)
        if shared_memory:  # the forward's sums are the widest: 2 per channel and the count, in fp64
            rank_sum = shared_memory_sum(process_group, slot_bytes=(2 * widest + 1) * 8)
        rank_sum = rank_sum or GlooSum(process_group)
    return _convert_cpu(module, process_group, rank_sum)


def _convert_cpu(module: nn.Module, group: Any, rank_sum: RankSum | None) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group=group, rank_sum=rank_sum)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child, group, rank_sum))
    return module
