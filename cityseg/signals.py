"""Graceful stops: a signal only sets a flag; the ranks agree on it at the next step, save and exit.

torchrun, SLURM and submitit send SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 before killing a job. No collective
ever runs inside a handler: the handler records the signal, and :meth:`StopFlag.poll`, called once per step by
every rank, all-reduces the flags (MAX) on a CPU/gloo group. The reduction started at step ``t`` is read at
step ``t + 1``, so the GPU never waits for it and every rank sees the same answer at the same iteration.

A second signal exits at once. Duplicates that arrive together count once: under torchrun a Ctrl-C reaches
the workers both from the terminal and forwarded by the agent, within milliseconds.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
DEBOUNCE_S = 1.0


class StopFlag:
    """Records a stop signal and lets all ranks agree on it."""

    def __init__(self, group: Any = None):
        self.signum = 0
        self.first_at = 0.0
        self.group = group
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        """Take over the stop signals (main thread only); :meth:`restore` gives them back."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum and now - self.first_at > DEBOUNCE_S:
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self.first_at = signum, now

    def poll(self) -> int:
        """The agreed stop signal (0 = keep going). Every rank must call this at every step."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([self.signum], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def drain(self) -> None:
        """Wait for an outstanding reduction (before checkpointing or tearing the group down)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    return signal.Signals(signum).name
