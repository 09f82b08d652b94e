"""The shared-memory sum over ranks of one host: exact rank-order sums, agreement to fall back, no silent hang,
and DDP gradients averaged through it."""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from cityseg import shm
from conftest import free_port

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm"),
                                reason="the shared-memory sum is used on x86 hosts with /dev/shm only")
CALLS = 60


def _tensor(call: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part at ``call``: sizes and dtypes vary from call to call, as BatchNorm layers' do."""
    g = torch.Generator().manual_seed(1000 * call + rank)
    n = 1 + call * 7 % 257
    dtype = torch.float64 if call % 3 else torch.float32
    return (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** (call % 5)).to(dtype)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _sum_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        summer = shm.shared_memory_sum(slot_bytes=257 * 8)
        assert summer is not None
        jitter = random.Random(rank)
        got = []
        for call in range(CALLS):
            if jitter.random() < 0.3:  # put the ranks out of step, so fast ranks race ahead into the next call
                time.sleep(jitter.random() * 0.005)
            got.append(summer(_tensor(call, rank)))
            if call % 7 == 0:  # in-place sums of tensors many slots long, between the small ones
                big = _big(call, rank)
                assert summer.sum_(big) is big
                got.append(big)
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _big(call: int, rank: int) -> torch.Tensor:
    """A tensor 3.4 to 5.3 slots long (an odd number of elements), as a DDP gradient bucket is."""
    g = torch.Generator().manual_seed(7919 * call + rank)
    dtype = torch.float32 if call % 2 else torch.float64
    n = 257 * 8 * (7 + call % 4) // (2 * dtype.itemsize) * 2 + 1
    return torch.randn(n, generator=g, dtype=dtype) * 10 ** (call % 5)


def test_sums_equal_rank_order_sums_bit_for_bit(tmp_path):
    world = 3
    mp.spawn(_sum_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    expected = []
    for call in range(CALLS):
        expected.append(torch.stack([_tensor(call, r) for r in range(world)]).sum(dim=0))
        if call % 7 == 0:
            total = _big(call, 0)
            for r in range(1, world):
                total += _big(call, r)  # rank order, as in a left-to-right sum
            expected.append(total)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert len(got) == len(expected)
        for i, (value, want) in enumerate(zip(got, expected)):
            assert value.dtype == want.dtype and torch.equal(value, want), (rank, i)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("cityseg-sum-")]  # nothing left behind


def _fallback_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        if rank == 1:  # this rank cannot map rank 0's file, as on another host or in another container
            shm._open = lambda path, token: None
        summer = shm.shared_memory_sum()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(summer is None, f)
    finally:
        dist.destroy_process_group()


def test_all_ranks_fall_back_when_one_cannot_map(tmp_path):
    mp.spawn(_fallback_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [True, True]


def _stall_worker(rank: int, world: int, port: int, out: str, peer_exits: bool) -> None:
    _init(rank, world, port)
    summer = shm.shared_memory_sum(timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        if peer_exits:
            os._exit(0)  # dies without a word
        time.sleep(6)  # alive, but never sends
        return
    t0 = time.monotonic()
    try:
        summer(torch.ones(3, dtype=torch.float64))
        message = "returned"
    except RuntimeError as e:
        message = str(e)
    with open(f"{out}/rank0.json", "w") as f:
        json.dump({"message": message, "seconds": time.monotonic() - t0}, f)


@pytest.mark.parametrize("peer_exits", [True, False], ids=["peer-exits", "peer-stalls"])
def test_a_missing_peer_raises_instead_of_hanging(tmp_path, peer_exits):
    mp.spawn(_stall_worker, args=(2, free_port(), str(tmp_path), peer_exits), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    expected = "rank 1 (pid" if peer_exits else "rank 1 sent no BatchNorm statistics or gradients for 2 s"
    assert expected in result["message"]
    assert result["seconds"] < 5


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                    torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10))
        plain = copy.deepcopy(model)
        ddp = DDP(model, bucket_cap_mb=0.01, gradient_as_bucket_view=True)  # several buckets
        summer = shm.shared_memory_sum(slot_bytes=1000)  # and several slots per bucket
        assert summer is not None
        ddp.register_comm_hook(summer, shm.average_gradients_hook)
        steps = []
        for step in range(3):  # DDP rebuilds its buckets after the first step
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(4, 3, 12, 12, generator=g) * (rank + 1)
            ddp.zero_grad(), plain.zero_grad()
            ddp(x).square().mean().backward()
            plain(x).square().mean().backward()
            steps.append({"ddp": [p.grad.clone() for p in model.parameters()],
                          "local": [p.grad.clone() for p in plain.parameters()]})
        torch.save(steps, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_hook_averages_gradients(tmp_path):
    world = 3
    mp.spawn(_ddp_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for step in range(3):
        for i, grad in enumerate(runs[0][step]["ddp"]):
            mean = sum(run[step]["local"][i] for run in runs) / world  # each rank's own gradient, averaged
            assert grad.abs().max() > 0
            torch.testing.assert_close(grad, mean, rtol=1e-5, atol=1e-7)
            for run in runs[1:]:  # and every rank steps with the same bits
                assert torch.equal(run[step]["ddp"][i], grad), (step, i)
