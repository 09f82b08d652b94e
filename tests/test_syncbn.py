"""CPUSyncBatchNorm on 2 gloo processes equals plain BatchNorm on the concatenated batch, whichever way the
ranks' sums travel (gloo or shared memory)."""

from __future__ import annotations

import os
import platform

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from cityseg.shm import SharedMemorySum
from cityseg.syncbn import CPUSyncBatchNorm, GlooSum, convert_sync_batchnorm
from conftest import free_port

C = 5
BATCHES = (3, 1)  # unequal per-rank batches: the statistics must weight ranks by their element counts


def _data(std: float = 3.0, mean: float = 1.5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(BATCHES), C, 6, 7, generator=g) * std + mean
    w = torch.randn(sum(BATCHES), C, 6, 7, generator=g)  # a fixed projection makes a non-trivial loss
    weight = torch.rand(C, generator=g) + 0.5
    bias = torch.randn(C, generator=g)
    return x, w, weight, bias


def _make_bn(cls, weight, bias):
    bn = cls(C, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _run_steps(bn, x, w, steps=2):
    """Two training-mode steps; returns output, input grad, parameter grads of the last one."""
    for _ in range(steps):
        xi = x.clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(xi)
        (y * w).sum().backward()
    return y.detach(), xi.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


def _worker(rank: int, world: int, port: int, out: str, moments: tuple[float, float], transport: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w, weight, bias = _data(*moments)
        lo = sum(BATCHES[:rank])
        sl = slice(lo, lo + BATCHES[rank])
        bn = convert_sync_batchnorm(_make_bn(nn.BatchNorm2d, weight, bias), torch.device("cpu"),
                                    shared_memory=transport == "shm")
        assert isinstance(bn.rank_sum, SharedMemorySum if transport == "shm" else GlooSum)
        y, gx, gw, gb = _run_steps(bn, x[sl], w[sl])
        # DDP would sum parameter gradients over ranks; do the same here.
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        torch.save({"y": y, "gx": gx, "gw": gw, "gb": gb, "rm": bn.running_mean, "rv": bn.running_var,
                    "eval": bn.eval()(x[sl])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(x, w, weight, bias, dtype):
    """Plain BatchNorm2d on the concatenated batch, in ``dtype``: every quantity the workers save."""
    bn = _make_bn(nn.BatchNorm2d, weight, bias).to(dtype)
    y, gx, gw, gb = _run_steps(bn, x.to(dtype), w.to(dtype))
    return {"y": y, "gx": gx, "gw": gw, "gb": gb, "rm": bn.running_mean, "rv": bn.running_var,
            "eval": bn.eval()(x.to(dtype)).detach()}


# (std, mean) of the input: an ordinary one, and one whose mean is 600 standard deviations from zero, where
# statistics taken as E[x^2] - E[x]^2 in fp32 lose the variance to cancellation (an error of 0.09 on outputs
# of magnitude 5.6 when tried).
# The yardstick is BatchNorm2d in fp64 on the concatenated batch; the synchronised one, in fp32 over two ranks,
# must be within 1e-5 of the largest value (about a hundred fp32 roundings) or twice PyTorch's own fp32 error.
@pytest.mark.parametrize("moments", [(3.0, 1.5), (0.5, 300.0)], ids=["plain", "large-mean"])
@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_cpu_syncbn_matches_batchnorm_on_concatenated_batch(tmp_path, moments, transport):
    if transport == "shm" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the shared-memory sum is used on x86 hosts only")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), moments, transport), nprocs=2, join=True)
    data = _data(*moments)
    exact, native = _reference(*data, torch.float64), _reference(*data, torch.float32)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ours = {k: torch.cat([p[k] for p in parts]) for k in ("y", "gx", "eval")}
    for p in parts:  # parameter gradients (summed over ranks) and running statistics agree on both ranks
        ours.update({k: p[k] for k in ("gw", "gb", "rm", "rv")})
        for key, value in ours.items():
            err = (value.double() - exact[key]).abs().max().item()
            native_err = (native[key].double() - exact[key]).abs().max().item()
            scale = exact[key].abs().max().item()
            assert err <= max(2 * native_err, 1e-5 * scale), (key, err, native_err, scale)


def test_convert_replaces_every_batchnorm_and_keeps_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
    conv = convert_sync_batchnorm(net, torch.device("cpu"))
    bns = [m for m in conv.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 and all(isinstance(m, CPUSyncBatchNorm) for m in bns)
    assert torch.all(conv[1].running_mean == 0.25)


def test_single_process_syncbn_is_batchnorm():
    x, w, weight, bias = _data()
    a = _run_steps(_make_bn(CPUSyncBatchNorm, weight, bias), x, w)
    b = _run_steps(_make_bn(nn.BatchNorm2d, weight, bias), x, w)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_channels_last_statistics_keep_nchw_accuracy():
    # PyTorch's channels_last CPU BatchNorm takes its statistics with errors tens of times those of its NCHW
    # kernel when the mean is large against the spread (the trainer runs channels_last on CPU, with ours).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, 128, generator=g) + 10.0
    exact = nn.BatchNorm2d(8).double()(x.double())
    native_nchw = nn.BatchNorm2d(8)(x)
    ours = CPUSyncBatchNorm(8)(x.contiguous(memory_format=torch.channels_last))
    err = (ours.double() - exact).abs().max().item()
    assert err <= 2 * (native_nchw.double() - exact).abs().max().item(), err
