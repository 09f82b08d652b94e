"""Synchronised BatchNorm for every device: :class:`CUDASyncBatchNorm` on GPUs, :class:`CPUSyncBatchNorm` on CPU.

On GPUs, ``nn.SyncBatchNorm`` drops the statistics of ranks with empty batches by a boolean index, which reads
the mask back to the host: a stream synchronisation in each of a U-Net's BatchNorm layers, every step.
:class:`CUDASyncBatchNorm` computes the same thing from the same fused CUDA kernels (``batch_norm_stats``,
``batch_norm_elemt``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``) with one all-reduce of
(sum, sum of squares, count) per forward and one of the gradient sums per backward, and no host
synchronisation (cityseg never gives a rank an empty batch).

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
        total = stats[-1:]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        shift, var32 = (mean - mean_l64).float(), var.float()  # shift: the global mean in xc's coordinates
        y = torch.batch_norm(xc, weight, bias, shift, var32, False, 0.0, eps, False)
        ctx.save_for_backward(xc, weight, shift, var32, total)
        ctx.eps, ctx.dtype, ctx.group = eps, x.dtype, group
        return y.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):  # type: ignore[override]
        xc, weight, shift, var, total = ctx.saved_tensors
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
        mean_dy, mean_dy_xhat = (sums / total).float().split(c)
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


class _CUDASyncBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over all ranks' batches from PyTorch's fused CUDA kernels, with no host sync.

    Forward: local mean and variance (``batch_norm_stats`` with eps 0 returns ``1/std``), one fp64 all-reduce
    of ``[n*mean, n*(var + mean^2), n]`` (sums added in fp64, so no cancellation in fp32), the global mean and
    ``1/sqrt(var + eps)``, then ``batch_norm_elemt``. Backward: ``batch_norm_backward_reduce`` gives the local
    ``sum(dy)`` and ``sum(dy * (x - mean))`` (and the weight and bias gradients), one all-reduce sums them,
    ``batch_norm_backward_elemt`` forms dx with the global count.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):  # type: ignore[override]
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        c = x.shape[1]
        n = x.numel() // c
        mean_l, inv_std_l = torch.batch_norm_stats(x, 0.0)
        inv_std_l = inv_std_l.double()  # 0 for a channel of one value (batch_norm_stats guards the division)
        mean_l64 = mean_l.double()
        var_l64 = torch.where(inv_std_l > 0, inv_std_l.pow(-2), torch.zeros_like(inv_std_l))
        stats = torch.cat([mean_l64 * n, (var_l64 + mean_l64 * mean_l64) * n,
                           torch.full((1,), float(n), dtype=torch.float64, device=x.device)])
        if _world(group) > 1:
            dist.all_reduce(stats, group=group)
        total = stats[-1:]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        mean32, invstd = mean.float(), torch.rsqrt(var + eps).float()
        y = torch.batch_norm_elemt(x, weight, bias, mean32, invstd, eps)
        ctx.save_for_backward(x, weight, mean32, invstd, total.to(torch.int32))
        ctx.group = group
        return y, mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        if not dy.is_contiguous(memory_format=torch.channels_last):
            dy = dy.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, need_x, need_w and weight is not None, need_b and weight is not None)
        dx = None
        if need_x:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            if _world(ctx.group) > 1:
                dist.all_reduce(sums, group=ctx.group)
            sum_dy, sum_dy_xmu = sums.split(sum_dy.shape[0])
            w = weight.to(mean.dtype) if weight is not None and weight.dtype != mean.dtype else weight
            dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
        return dx, gw, gb, None, None


class _SyncBatchNormBase(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batches of all ranks of ``process_group`` (the
    default group when None); ``FUNCTION`` computes them, this class keeps the running statistics."""

    FUNCTION: Any = None

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self._train_forward(x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        y, mean, var, total = self.FUNCTION.apply(x, self.weight if self.affine else None,
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


class CPUSyncBatchNorm(_SyncBatchNormBase):
    """Synchronised BatchNorm2d for CPU tensors (sums over a gloo group)."""

    FUNCTION = _SyncBatchNorm


class CUDASyncBatchNorm(_SyncBatchNormBase):
    """Synchronised BatchNorm2d for CUDA tensors, without host synchronisation (sums over NCCL, or gloo)."""

    FUNCTION = _CUDASyncBatchNorm


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm2d with the synchronised one for ``device``, summing over ``process_group``."""
    cls = CUDASyncBatchNorm if device.type == "cuda" else CPUSyncBatchNorm
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, _SyncBatchNormBase):
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  process_group=process_group)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return module


def run_eagerly_under_compile() -> None:
    """Keep the synchronized BatchNorms' training forward out of torch.compile's graphs; call it before compiling.

    Run eagerly, the collectives would break the graph anyway, and on CPU the compiler's fused reductions over a
    channels_last map took the statistics with errors of about 2% of the gradients in a tiny U-Net, against
    7e-5 eagerly. Applied here rather than as a decorator: ``torch.compiler.disable`` imports torch's compiler,
    about a second at the start of every process that never compiles."""
    forward = _SyncBatchNormBase._train_forward
    if not getattr(forward, "_torchdynamo_disable", False):
        _SyncBatchNormBase._train_forward = torch.compiler.disable(forward)
