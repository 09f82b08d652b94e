"""Sum tensors over the ranks of one host through shared memory: CPU synchronised BatchNorm's statistics and
DDP's gradients.

BatchNorm synchronises twice per layer and step, a few hundred bytes each time, and a gloo all_gather of that
takes about 0.4 ms on the 2-core CI machine. Ranks on one host can instead write their part into shared pages
and read each other's, which costs little more than waiting for the slowest rank (``bench/run.py`` prints both).
Gradients go the same way, a slot at a time, in the backward pass (:func:`average_gradients_hook`): gloo would
all-reduce them on threads of its own, which compete for the cores the ranks compute on.

Each rank owns two payload buffers (used alternately) and a call counter in a file under ``/dev/shm``. Call k
writes the payload into buffer k % 2, then publishes k; a rank reads the others' buffers once all counters have
reached k. Rank r cannot reach call k + 2, and overwrite buffer k % 2, before every rank has published k + 1,
which each does only after reading call k's buffers. Publishing relies on x86's ordering of stores (payload
before counter) and of loads (counter before payload), so other architectures keep gloo. Two kinds of x86
store are not ordered that way: the stores within one string instruction (ordered as a whole against the
counter's later, separate store) and non-temporal stores, which glibc's memcpy uses only above its
non-temporal threshold (megabytes or more) and fences before it returns.
"""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import secrets
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"  # tmpfs: never shared between hosts, unlike /tmp on some clusters
HEADER = 64  # bytes: the setup token; then one 64-byte line per rank, its call counter first
TOKEN = 16


class SharedMemorySum:
    """``summer(t)``: the sum of ``t`` over the group's ranks, added in rank order (bitwise equal on all)."""

    def __init__(self, mapping: mmap.mmap, rank: int, world: int, slot: int, pids: list[int] | None,
                 timeout: datetime.timedelta):
        self.rank, self.world, self.slot, self.pids, self.timeout = rank, world, slot, pids, timeout.total_seconds()
        self._map = mapping
        lines = np.frombuffer(mapping, dtype=np.int64, count=world * 8, offset=HEADER).reshape(world, 8)
        self._calls = lines[:, 0]
        base = HEADER + world * 64
        self._buffers = [[np.frombuffer(mapping, dtype=np.uint8, count=slot, offset=base + (2 * r + k) * slot)
                          for k in range(2)] for r in range(world)]
        self._k = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        a = t.detach().contiguous().numpy()
        if a.nbytes > self.slot:
            raise ValueError(f"{a.nbytes} bytes do not fit a {self.slot}-byte shared-memory slot")
        parts = [torch.from_numpy(p.reshape(a.shape)) for p in self._exchange(a.reshape(-1))]
        return torch.stack(parts).sum(dim=0)  # stack copies out of the buffers before they can be reused

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Replace contiguous ``t`` by its sum over the ranks, in rank order, a slot at a time; return ``t``.

        For tensors of any size, such as DDP's gradient buckets: each slot-sized piece is one exchange.
        """
        flat = t.detach().view(-1)  # a view: raises for a non-contiguous tensor instead of summing a copy
        a = flat.numpy()
        step = self.slot // a.itemsize
        for start in range(0, a.size, step):
            parts = [torch.from_numpy(p) for p in self._exchange(a[start:start + step])]
            piece = flat[start:start + step]
            piece.copy_(parts[0])  # this rank's part is in its buffer already, so it may be overwritten
            for p in parts[1:]:
                piece.add_(p)
        return t

    def _exchange(self, a: np.ndarray) -> list[np.ndarray]:
        """Publish 1-D ``a`` (at most a slot) and return every rank's, as views of the buffers of this call.

        The views stay valid until this rank's next call: no rank can start overwriting them before every rank
        has published that call.
        """
        self._k += 1
        k, half = self._k, self._k % 2
        self._buffers[self.rank][half][: a.nbytes] = a.view(np.uint8)
        self._calls[self.rank] = k  # publish only after the payload is written
        for r in range(self.world):
            if self._calls[r] < k:
                self._wait(r, k)
        return [self._buffers[r][half][: a.nbytes].view(a.dtype) for r in range(self.world)]

    def _wait(self, r: int, k: int) -> None:
        """Spin (yielding the core) until rank r publishes call k; raise if it died or the timeout passed."""
        start = last_check = time.monotonic()
        while self._calls[r] < k:
            os.sched_yield()
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                if self.pids is not None and not _alive(self.pids[r]):
                    raise RuntimeError(f"rank {r} (pid {self.pids[r]}) exited while rank {self.rank} waited for "
                                       "its BatchNorm statistics or gradients; its own log has the cause.")
                if now - start > self.timeout:
                    raise RuntimeError(f"rank {r} sent no BatchNorm statistics or gradients for "
                                       f"{self.timeout:.0f} s; it is stuck or ran a different model or step.")


def average_gradients_hook(summer: SharedMemorySum, bucket):  # type: ignore[no-untyped-def]
    """A DDP communication hook: average a gradient bucket over the ranks through ``summer``.

    Register it with ``ddp.register_comm_hook(summer, average_gradients_hook)``. The sum runs in the backward
    pass itself, where gloo's all_reduce would run on threads of its own; on a CPU host those threads compete
    for the cores the ranks compute on. The result is the same on every rank, bit for bit.

    It is unannotated because DDP rejects a hook whose annotations are not the objects ``dist.GradBucket``
    and ``torch.futures.Future[torch.Tensor]``, and this module's annotations are strings.
    """
    grads = summer.sum_(bucket.buffer()).div_(summer.world)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(grads)
    return fut


def shared_memory_sum(group: Any = None, slot_bytes: int = 1 << 16,
                      timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> SharedMemorySum | None:
    """Set up a :class:`SharedMemorySum` over ``group`` for tensors of up to ``slot_bytes`` (collective), or
    None where its ranks share no memory.

    Every rank must call this together. The ranks agree on the outcome: if any of them cannot map rank 0's file
    and read back the token rank 0 wrote into it (another host, another container), all of them get None.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    slot = -(-slot_bytes // 64) * 64  # whole cache lines
    usable = platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    path, token = "", b""
    if rank == 0 and usable:
        path, token = _create(HEADER + world * (64 + 2 * slot))
        usable = bool(path)
    box: list[Any] = [(usable, path, token)]
    dist.broadcast_object_list(box, src=src, group=group)
    usable, path, token = box[0]
    mapping = _open(path, token) if usable else None
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (mapping is not None, os.getpid(), _pid_namespace()), group=group)
    if rank == 0 and path:
        os.unlink(path)  # the mappings stay valid; nothing is left behind if a rank dies later
    if not all(ok for ok, _, _ in views):
        if mapping is not None:
            mapping.close()
        return None
    # Peers' pids tell whether they are alive only if all ranks see one pid namespace.
    same_pids = views[0][2] is not None and all(ns == views[0][2] for _, _, ns in views)
    return SharedMemorySum(mapping, rank, world, slot, [pid for _, pid, _ in views] if same_pids else None, timeout)


def _create(size: int) -> tuple[str, bytes]:
    """A zero-filled file of ``size`` bytes under SHM_DIR with a random token at its start; ("", b"") if it
    cannot be made (a full or read-only /dev/shm), which makes every rank fall back to gloo."""
    token = secrets.token_bytes(TOKEN)
    try:
        fd, path = tempfile.mkstemp(prefix="cityseg-sum-", dir=SHM_DIR)
    except OSError:
        return "", b""
    try:
        os.posix_fallocate(fd, 0, size)  # reserve the pages now: a full tmpfs would fail later with SIGBUS
        os.pwrite(fd, token, 0)
    except OSError:
        os.unlink(path)
        return "", b""
    finally:
        os.close(fd)
    return path, token


def _open(path: str, token: bytes) -> mmap.mmap | None:
    """Map rank 0's file if this rank sees it, with rank 0's token in it; None otherwise."""
    try:
        with open(path, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), 0)
    except OSError:
        return None
    if mapping[:TOKEN] != token:
        mapping.close()
        return None
    return mapping


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), None where it cannot be told."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this pid namespace exists and is not a zombie (True where /proc cannot
    tell)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
