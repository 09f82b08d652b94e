"""Graceful stops: a signal only sets a flag; the ranks agree on it at the next step, save and exit.

torchrun, SLURM and submitit send SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 before killing a job. No collective
ever runs inside a handler: the handler records the signal, and :meth:`StopFlag.poll`, called once per step by
every rank, all-reduces the flags (MAX) on a CPU/gloo group. The reduction started at step ``t`` is read at
step ``t + 1``, so the GPU never waits for it and every rank sees the same answer at the same iteration.

A second signal exits at once. Duplicates that arrive together count once: under torchrun a Ctrl-C reaches
the workers both from the terminal and forwarded by the agent, within milliseconds.

The same agreement stops the ranks when one of them cannot load a sample (:meth:`StopFlag.fail`): they agree
on :data:`DATA_ERROR`, which outranks every signal, save a checkpoint and report the file.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
DEBOUNCE_S = 1.0
#: The agreed stop code when a rank could not load a sample; above every signal number, so it wins the MAX.
DATA_ERROR = 1000


class StopFlag:
    """Records a stop signal and lets all ranks agree on it."""

    def __init__(self, group: Any = None):
        self.signum = 0
        self.failed = False
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

    def fail(self) -> None:
        """This rank cannot go on (a sample failed to load): make the ranks agree on :data:`DATA_ERROR`."""
        self.failed = True

    def _local(self) -> int:
        return DATA_ERROR if self.failed else self.signum

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def poll(self) -> int:
        """The agreed stop code (0 = keep going; a signal number; :data:`DATA_ERROR`), as of the previous
        call. Every rank must call this at every step."""
        if not self._distributed():
            return self._local()
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([self._local()], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def agree_now(self) -> int:
        """The stop code every rank has now (blocking; every rank must call it)."""
        self.drain()
        flag = torch.tensor([self._local()], dtype=torch.int32)
        if self._distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def drain(self) -> None:
        """Wait for an outstanding reduction (before checkpointing or tearing the group down)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def exit_on_stop_signals() -> None:
    """Make the stop signals exit at once with status 128 + signal, quietly: an entry script's handlers
    before training takes the signals over and after it gives them back."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: exit_now(128 + signum))


def exit_now(status: int) -> None:
    """Flush and exit with ``status`` without Python's shutdown, once everything is saved and closed.

    While Python shuts down it puts the default handlers back, and a SIGTERM then kills the process with no
    status of its own; under torchrun that is what happens to a stopped rank still exiting when another one
    has exited already, since the agent sends SIGTERM to the ranks that remain.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    return "a sample that failed to load" if signum == DATA_ERROR else signal.Signals(signum).name
