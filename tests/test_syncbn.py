"""CPUSyncBatchNorm on 2 gloo processes equals plain BatchNorm on the concatenated batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from cityseg.syncbn import CPUSyncBatchNorm, convert_sync_batchnorm
from conftest import free_port

C = 5
BATCHES = (3, 1)  # unequal per-rank batches: the statistics must weight ranks by their element counts


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(BATCHES), C, 6, 7, generator=g) * 3 + 1.5
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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w, weight, bias = _data()
        lo = sum(BATCHES[:rank])
        sl = slice(lo, lo + BATCHES[rank])
        bn = _make_bn(CPUSyncBatchNorm, weight, bias)
        y, gx, gw, gb = _run_steps(bn, x[sl], w[sl])
        # DDP would sum parameter gradients over ranks; do the same here.
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        torch.save({"y": y, "gx": gx, "gw": gw, "gb": gb, "rm": bn.running_mean, "rv": bn.running_var,
                    "eval": bn.eval()(x[sl])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cpu_syncbn_matches_batchnorm_on_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    x, w, weight, bias = _data()
    ref = _make_bn(nn.BatchNorm2d, weight, bias)
    y, gx, gw, gb = _run_steps(ref, x, w)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    cat = lambda k: torch.cat([p[k] for p in parts])  # noqa: E731
    torch.testing.assert_close(cat("y"), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cat("gx"), gx, atol=1e-5, rtol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["gw"], gw, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p["gb"], gb, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p["rm"], ref.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(p["rv"], ref.running_var, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(cat("eval"), ref.eval()(x), atol=1e-5, rtol=1e-5)


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
