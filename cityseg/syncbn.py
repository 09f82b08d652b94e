"""Synchronised BatchNorm for every device: :class:`CUDASyncBatchNorm` on GPUs, :class:`CPUSyncBatchNorm` on CPU.

Both run the custom operator ``cityseg::sync_batch_norm`` (and its backward, ``cityseg::sync_batch_norm_backward``),
whose kernels take the training statistics over the batches of all ranks of a process group:

- CUDA: ``nn.SyncBatchNorm`` drops the statistics of ranks with empty batches by a boolean index, which reads the
  mask back to the host: a stream synchronisation in each of a U-Net's BatchNorm layers, every step. The CUDA
  kernel computes the same thing from the same fused kernels (``batch_norm_stats``, ``batch_norm_elemt``,
  ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``) with one all-reduce of (sum, sum of squares,
  count) per forward and one of the gradient sums per backward, and no host synchronisation (cityseg never gives
  a rank an empty batch).
- CPU: PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors. The CPU kernel sums per-channel statistics over the
  ranks (each contributing its own element count, so ranks with different batch sizes are weighted correctly)
  in its forward and the matching gradient sums in its backward, over a gloo group (the trainer gives BatchNorm
  a group of its own, so that its small sums do not queue behind DDP's gradient buckets). CPU runs of one
  process use it too, with nothing to sum: on channels_last maps it keeps the accuracy of PyTorch's NCHW kernel,
  which PyTorch's channels_last CPU kernel does not.

Being one operator with a fake kernel (shapes only) and a registered backward, it compiles: ``torch.compile``
puts it into the model's graph whole, forward and backward, with no graph break (PyTorch's own
``nn.SyncBatchNorm`` breaks the graph at every layer, pytorch/pytorch#161302), and the compiler never rewrites
its arithmetic (inductor's CPU code for an equivalent formulation took the gradients of a small U-Net's deep
layers with 10% error on real images, against 2e-6 for these kernels). A process group reaches the kernels by
name (:func:`group_key`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

#: The process groups the kernels know, by :func:`group_key` ("" is the default group).
_GROUPS: dict[str, Any] = {}


def group_key(group: Any) -> str:
    """The name the kernels reach ``group`` by (a compiled graph holds strings, not process groups)."""
    if group is None:
        return ""
    _GROUPS[group.group_name] = group
    return group.group_name


def _group(key: str) -> Any:
    return _GROUPS[key] if key else None


def world_of(group: Any) -> int:
    """How many ranks ``group`` has (1 without a process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank_sum(t: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of a small tensor over the ranks of a group, added in rank order, so every rank gets the same
    bits. A failed or timed-out collective (a peer that died or hangs) raises instead of waiting forever."""
    parts = [torch.empty_like(t) for _ in range(world_of(_group(group)))]
    dist.all_gather(parts, t.contiguous(), group=_group(group))
    return torch.stack(parts).sum(dim=0)


def _layout(ref: torch.Tensor) -> torch.memory_format:
    """The memory format of the kernels' activation-sized outputs (the fake kernels promise the same): channels_last
    for a channels_last input, else contiguous."""
    return torch.channels_last if ref.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The statistics' type: fp32, also under bf16/fp16 autocast, and fp64 for fp64 input (what the kernels read)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the operator -------------------------------------------------------------------------------------------
# Outputs: y, then the global mean, biased variance and element count (fp64, for the running statistics), then
# three tensors the backward needs, which differ by device: CPU (xc, shift, var), CUDA (unused, mean, 1/std).
SCHEMA = ("(Tensor x, Tensor? weight, Tensor? bias, float eps, str group, int world) -> "
          "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor dy, Tensor x, Tensor? weight, Tensor a, Tensor b, Tensor c, Tensor total, float eps, "
                   "str group, int world) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("cityseg::sync_batch_norm", mutates_args=(), schema=SCHEMA)
def sync_batch_norm(x, weight, bias, eps, group, world):  # type: ignore[no-untyped-def]
    """Training-mode BatchNorm over the union of all ranks' batches (dispatched to the CPU or CUDA kernel)."""
    return _cpu_forward(x, weight, bias, eps, group, world)


@torch.library.custom_op("cityseg::sync_batch_norm_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def sync_batch_norm_backward(dy, x, weight, a, b, c, total, eps, group, world):  # type: ignore[no-untyped-def]
    """The gradients of :func:`sync_batch_norm` (dx, and the weight's and bias's, empty without weights)."""
    return _cpu_backward(dy, weight, a, b, c, total, eps, group, world, x.dtype)


def _cpu_forward(x, weight, bias, eps, group, world):  # type: ignore[no-untyped-def]
    """Everything is computed on ``xc = x - local mean``, which is kept for the backward instead of ``x``:
    BatchNorm depends on ``x`` only through ``x - mean``, and with the large common offset gone nothing cancels,
    however far the mean is from zero. Per-channel local count, mean and sum of ``xc^2`` (pairwise sums, fast on
    CPU), one fp64 sum over ranks of ``[n*mean, M2 + n*mean^2, n]``, then the native eval-mode kernel with the
    global statistics."""
    c = x.shape[1]
    n = x.numel() // c
    acc = _acc(x.dtype)
    xf = x.to(acc).contiguous(memory_format=_layout(x))
    mean_l = xf.sum(dim=(0, 2, 3)) / n
    xc = xf - mean_l.view(1, c, 1, 1)
    m2 = (xc * xc).sum(dim=(0, 2, 3))
    mean_l64 = mean_l.double()
    stats = torch.cat([mean_l64 * n, m2.double() + n * mean_l64 * mean_l64,
                       torch.full((1,), float(n), dtype=torch.float64, device=x.device)])
    if world > 1:
        stats = rank_sum(stats, group)
    total = stats[-1:].clone()
    mean = stats[:c] / total
    var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
    shift, var_acc = (mean - mean_l64).to(acc), var.to(acc, copy=True)  # shift: the global mean, xc's coordinates
    y = torch.batch_norm(xc, weight, bias, shift, var_acc, False, 0.0, eps, False)
    return y.to(x.dtype).contiguous(memory_format=_layout(x)), mean, var, total, xc, shift, var_acc


def _cpu_backward(dy, weight, xc, shift, var, total, eps, group, world, dtype):  # type: ignore[no-untyped-def]
    """The eval-mode kernel given the global statistics yields the local ``sum(dy)`` and ``sum(dy * xhat)`` in
    one pass; one sum over ranks gives their global means, and dx, an affine function of ``dy`` and ``xc`` per
    channel, takes two more passes (five reads and two writes of the activation in all)."""
    c = xc.shape[1]
    dy = dy.to(xc.dtype)
    invstd = torch.rsqrt(var + eps)
    w = weight.to(xc.dtype) if weight is not None else torch.ones_like(shift)
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(dy, xc, w, shift, var, None, None, False, eps,
                                                          [False, True, True])
    sums = torch.cat([gb, gw]).double()
    if world > 1:
        sums = rank_sum(sums, group)
    mean_dy, mean_dy_xhat = (sums / total).to(xc.dtype).split(c)
    # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = a * dy + b * xc + b0 per channel: b * xc + b0
    # by the eval-mode kernel (zero mean, unit variance, no eps), then a * dy added in place.
    a = w * invstd
    b = -a * invstd * mean_dy_xhat
    b0 = -a * mean_dy - b * shift
    dx = torch.batch_norm(xc, b, b0, torch.zeros_like(b), torch.ones_like(b), False, 0.0, 0.0, False)
    dx.addcmul_(dy, a.view(1, c, 1, 1))
    dx = dx.to(dtype).contiguous(memory_format=_layout(xc))
    if weight is None:
        return dx, gw.new_empty(0), gb.new_empty(0)
    return dx, gw.to(weight.dtype), gb.to(weight.dtype)


@sync_batch_norm.register_kernel("cuda")
def _cuda_forward(x, weight, bias, eps, group, world):  # type: ignore[no-untyped-def]
    """Local mean and variance (``batch_norm_stats`` with eps 0 returns ``1/std``), one fp64 all-reduce of
    ``[n*mean, n*(var + mean^2), n]`` (sums added in fp64, so no cancellation in fp32), the global mean and
    ``1/sqrt(var + eps)``, then ``batch_norm_elemt``; no host synchronisation."""
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
    if world > 1:
        dist.all_reduce(stats, group=_group(group))
    total = stats[-1:].clone()
    mean = stats[:c] / total
    var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
    acc = _acc(x.dtype)
    mean_acc, invstd = mean.to(acc, copy=True), torch.rsqrt(var + eps).to(acc)  # outputs may not alias
    y = torch.batch_norm_elemt(x, weight, bias, mean_acc, invstd, eps).contiguous(memory_format=_layout(x))
    return y, mean, var, total, x.new_empty(0, dtype=acc), mean_acc, invstd


@sync_batch_norm_backward.register_kernel("cuda")
def _cuda_backward(dy, x, weight, a, mean, invstd, total, eps, group, world):  # type: ignore[no-untyped-def]
    """``batch_norm_backward_reduce`` gives the local ``sum(dy)`` and ``sum(dy * (x - mean))`` (and the weight's and
    bias's gradients), one all-reduce sums them, ``batch_norm_backward_elemt`` forms dx with the global count."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous()
    if not dy.is_contiguous(memory_format=torch.channels_last):
        dy = dy.contiguous()
    has_w = weight is not None
    sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, True, has_w, has_w)
    sums = torch.cat([sum_dy, sum_dy_xmu])
    if world > 1:
        dist.all_reduce(sums, group=_group(group))
    sum_dy, sum_dy_xmu = sums.split(sum_dy.shape[0])
    w = weight.to(mean.dtype) if has_w and weight.dtype != mean.dtype else weight
    dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, total.to(torch.int32))
    dx = dx.contiguous(memory_format=_layout(x))
    if not has_w:
        return dx, sum_dy.new_empty(0), sum_dy.new_empty(0)
    return dx, gw, gb


@sync_batch_norm.register_fake
def _(x, weight, bias, eps, group, world):  # type: ignore[no-untyped-def]
    c, acc, f64, layout = x.shape[1], _acc(x.dtype), torch.float64, _layout(x)
    y = torch.empty_like(x, memory_format=layout)
    stats = (x.new_empty(c, dtype=f64), x.new_empty(c, dtype=f64), x.new_empty(1, dtype=f64))
    saved = x.new_empty(0, dtype=acc) if x.device.type == "cuda" else torch.empty_like(x, dtype=acc,
                                                                                        memory_format=layout)
    return y, *stats, saved, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


@sync_batch_norm_backward.register_fake
def _(dy, x, weight, a, b, c, total, eps, group, world):  # type: ignore[no-untyped-def]
    n = weight.shape[0] if weight is not None else 0
    dtype = weight.dtype if weight is not None else b.dtype
    ref = x if x.device.type == "cuda" else a  # the CPU kernel's dx follows xc, the CUDA kernel's x
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=_layout(ref))
    return dx, dy.new_empty(n, dtype=dtype), dy.new_empty(n, dtype=dtype)


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, weight, _, eps, group, world = inputs
    _, _, _, total, a, b, c = output
    ctx.save_for_backward(x if x.device.type == "cuda" else None, weight, a, b, c, total)
    ctx.meta = (eps, group, world, x.dtype, x.shape, x.device)


def _backward(ctx, dy, *_):  # type: ignore[no-untyped-def]
    x, weight, a, b, c, total = ctx.saved_tensors
    eps, group, world, dtype, shape, device = ctx.meta
    if x is None:  # the CPU kernel keeps xc instead; the operator only needs x's type
        x = torch.empty((), dtype=dtype, device=device).expand(shape)
    dx, gw, gb = sync_batch_norm_backward(dy, x, weight, a, b, c, total, eps, group, world)
    return dx, (gw if weight is not None else None), (gb if weight is not None else None), None, None, None


sync_batch_norm.register_autograd(_backward, setup_context=_setup_context)


class _SyncBatchNormBase(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batches of all ranks of ``process_group`` (the
    default group when None) by :func:`sync_batch_norm`; this class keeps the running statistics."""

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self.group_key = group_key(process_group)  # how the compiled graph names the group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self._train_forward(x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        y, mean, var, total, *_ = sync_batch_norm(x, self.weight if self.affine else None,
                                                  self.bias if self.affine else None, self.eps, self.group_key,
                                                  world_of(self.process_group))
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


class CUDASyncBatchNorm(_SyncBatchNormBase):
    """Synchronised BatchNorm2d for CUDA tensors, without host synchronisation (sums over NCCL, or gloo)."""


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
