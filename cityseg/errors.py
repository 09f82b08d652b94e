"""Errors a user can cause, and how the entry scripts report them: one line, no traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


class UserError(Exception):
    """Something the user can fix (a path, a file, a flag); the message says what and how."""

    #: True when every rank raises the same error together; then only rank 0 prints it.
    collective = False
    #: True when a thread may still be blocked in native code: exit at once after printing, since the
    #: interpreter's shutdown could wait for it or abort.
    hard_exit = False

    def __init__(self, message: str, collective: bool | None = None):
        super().__init__(message)
        if collective is not None:
            self.collective = collective


class DataError(UserError):
    """Bad input data; the message names the path and what is wrong."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (a library's own, often long), without its period."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


def one_line(exc: BaseException) -> str:
    """The user-facing sentence of ``exc``, also when a DataLoader worker re-raised it with its traceback."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "\n" in text:  # torch.utils.data wraps worker errors with a traceback
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


@contextlib.contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a :class:`UserError` into ``error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except UserError as e:
        if not e.collective or speaks():
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        if e.hard_exit:
            sys.stdout.flush()
            os._exit(2)
        raise SystemExit(2) from None


def speaks() -> bool:
    """True on the process that reports what every rank meets alike: rank 0, or any process whose RANK and
    WORLD_SIZE are not a valid pair (so that a leftover ``RANK=1`` in a shell never silences an error)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    try:
        return not (0 < int(rank) < int(world))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
