"""The shared-memory sum over ranks of one host: exact rank-order sums, agreement to fall back, no silent hang."""

from __future__ import annotations

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
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sums_equal_rank_order_sums_bit_for_bit(tmp_path):
    world = 3
    mp.spawn(_sum_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for call, value in enumerate(got):
            expected = torch.stack([_tensor(call, r) for r in range(world)]).sum(dim=0)
            assert value.dtype == expected.dtype and torch.equal(value, expected), (rank, call)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("cityseg-syncbn-")]  # nothing left behind


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
    expected = "rank 1 (pid" if peer_exits else "rank 1 sent no BatchNorm statistics for 2 s"
    assert expected in result["message"]
    assert result["seconds"] < 5
