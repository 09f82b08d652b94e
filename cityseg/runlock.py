"""One owner per run directory: ``OUT/run.lock``, a lock file with a heartbeat, safe on NFS and Lustre.

Kernel locks are not used because what they promise depends on the file system: Lustre refuses ``flock``
unless mounted with ``-o flock`` and makes it node-local with ``-o localflock``; NFS emulates ``flock`` with
byte-range locks whose release after a client crash waits for that client to reboot (NFSv3) or for its lease
to expire (NFSv4). What every shared file system does guarantee is an atomic create-if-absent (a hard link,
or ``O_EXCL``), an atomic rename, and modification times that another client sees once it opens the file.

So the run that owns a directory creates ``run.lock`` (host, pid, start time, a random token) and touches it
every ``heartbeat_s`` seconds; on a clean stop it deletes it. A run that finds the file:

- on the same host, refuses with one line naming the holder while the holder's process runs (the same
  process, by its start time), and takes the directory over at once when it does not, or when the host
  rebooted since;
- from another host, takes it over at once when the last heartbeat is ``stale_s`` seconds old; otherwise it
  watches the heartbeat for at most ``stale_s`` seconds: refuses once it moves, takes over if it never does.

A holder that finds its lock taken over (it was stopped for longer than ``stale_s``, or cut off from the file
system) exits at once, before it writes anything more. Clocks of the hosts should agree within a few seconds
(NTP): the age of a heartbeat is read against the reader's clock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import distributed as du
from .errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
#: For tests only: another staleness in seconds, so that a test need not wait a minute (documented as such).
STALE_ENV = "CITYSEG_LOCK_STALE_S"


def stale_seconds() -> float:
    """How old another host's heartbeat must be before its lock is taken over: 60 s, or CITYSEG_LOCK_STALE_S."""
    return float(os.environ.get(STALE_ENV, STALE_S))


class RunLockError(UserError):
    """Another run owns the run directory."""

    collective = True


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _identity() -> dict[str, Any]:
    """Who this process is, in terms another process can check."""
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())}


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), None where it cannot be told."""
    text = _read_text(f"/proc/{pid}/stat")
    try:
        return int(text.rsplit(")", 1)[1].split()[19]) if text else None
    except (IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    """Whether process ``pid`` of this host and pid namespace runs and is the one that started at
    ``start_ticks`` (not a later process that got the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    state = _read_text(f"/proc/{pid}/stat")
    if state and state.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False  # exited, not yet reaped
    return start_ticks is None or _start_ticks(pid) in (None, start_ticks)


def describe(holder: dict[str, Any]) -> str:
    """``host vm, pid 1234, started 2026-11-26 10:00:01`` for a holder record."""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


class RunLock:
    """The lock of one run directory, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, directory: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 say: Callable[[str], None] = print, on_lost: Callable[[str], None] | None = None,
                 flag: str = "--out-dir", kind: str = "training run"):
        self.dir = Path(directory)
        self.flag, self.kind = flag, kind  # how the user names the directory, and what owns one
        self.path = self.dir / LOCK_NAME
        self.heartbeat_s, self.stale_s, self.say = heartbeat_s, stale_s, say
        self.on_lost = on_lost or _exit_lost
        self.record = {**_identity(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it --------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Own the directory, or raise :class:`RunLockError` naming the live holder."""
        while True:
            if not self.path.exists() and self._create():
                break
            seen = self._observe()
            if seen is None:
                continue  # it went away meanwhile: try again
            holder, mtime = seen
            verdict = self._judge(holder, mtime)
            if verdict == "watch":
                verdict = self._watch(holder, mtime)
            if verdict == "live":
                raise RunLockError(f"{self.flag} {self.dir}: another {self.kind} owns this directory "
                                   f"({describe(holder)}); wait for it to end or stop it, or pass another "
                                   f"{self.flag}. If it is dead, delete {self.path} by hand.")
            if verdict == "dead" and self._break(holder):
                self.say(f"took over {self.path} from a run that is gone ({describe(holder)})")
        self._thread = threading.Thread(target=self._beat, name="cityseg-run-lock", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Create the lock atomically with its full content; False if one exists."""
        data = json.dumps(self.record).encode()
        tmp = self.dir / f".{LOCK_NAME}.{self.record['token']}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic create-if-absent, also on NFS
            return True
        except FileExistsError:
            return False
        except OSError as e:  # no hard links here: fall back to an exclusive create
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _observe(self) -> tuple[dict[str, Any], float] | None:
        """The lock's record and modification time, read through a fresh open (NFS revalidates its cached
        attributes on open); None if there is no lock file."""
        try:
            with open(self.path, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # unreadable: judged by its age alone
        return (holder if isinstance(holder, dict) else {}), mtime

    def _judge(self, holder: dict[str, Any], mtime: float) -> str:
        """``live``, ``dead``, or ``watch`` (another host whose last heartbeat is recent)."""
        me = self.record
        if holder.get("host") == me["host"] and me["boot_id"] and holder.get("boot_id"):
            if holder["boot_id"] != me["boot_id"]:
                return "dead"  # this host rebooted since the holder wrote it
            if holder.get("pid_ns") == me["pid_ns"] and isinstance(holder.get("pid"), int):
                return "live" if _alive(holder["pid"], holder.get("start_ticks")) else "dead"
        return "dead" if time.time() - mtime >= self.stale_s else "watch"

    def _watch(self, holder: dict[str, Any], mtime: float) -> str:
        """Watch another host's lock: ``live`` once its heartbeat moves, ``dead`` once it is ``stale_s``
        seconds old, by this host's clock or by watching it stand still that long."""
        wait = max(0.0, self.stale_s - (time.time() - mtime))
        self.say(f"{self.path} is held by {describe(holder)}, last heartbeat {time.time() - mtime:.0f} s ago; "
                 f"watching it for up to {wait:.0f} s to see whether that run is alive")
        start = time.monotonic()
        while time.monotonic() - start < self.stale_s and time.time() - mtime < self.stale_s:
            time.sleep(min(1.0, self.heartbeat_s / 4))
            seen = self._observe()
            if seen is None or seen[0].get("token") != holder.get("token"):
                return "again"  # released or taken by someone else: look again
            if seen[1] != mtime:
                return "live"
        return "dead"

    def _break(self, holder: dict[str, Any]) -> bool:
        """Remove the dead holder's lock, and only that one; True if it was removed here."""
        moved = self.dir / f".{LOCK_NAME}.broken.{self.record['token']}"
        try:
            os.rename(self.path, moved)  # atomic: of several contenders one wins
        except FileNotFoundError:
            return False
        record = self._read_record(moved)
        if record.get("token") != holder.get("token"):  # a new lock appeared since it was judged: put it back
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        return True

    @staticmethod
    def _read_record(path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    # -- holding it -------------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read_record(self.path)
            if current.get("token") != self.record["token"]:
                self.on_lost(f"{self.flag} {self.dir}: this run lost {self.path} to another run "
                             f"({describe(current) if current else 'the file is gone'}), after no heartbeat for "
                             f"{self.stale_s:.0f} s; stopping before writing anything more.")
                return
            try:
                os.utime(self.path)  # None: the file server's clock on NFS
            except OSError:
                pass  # the next beat tries again; only a lock stale for stale_s can be taken

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._read_record(self.path).get("token") == self.record["token"]:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only directory: the next run finds this process gone and takes over


def _exit_lost(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # at once, from the heartbeat thread: the directory has another owner now


@contextlib.contextmanager
def own_directory(directory: str | Path, ctx: du.DistContext, flag: str = "--out-dir",
                  kind: str = "training run") -> Iterator[None]:
    """Rank 0 creates ``directory`` and holds its lock for the duration; every rank raises
    :class:`RunLockError` together if another run owns it. Collective: every rank enters it. ``flag`` and
    ``kind`` say in the messages how the user names the directory and what else owns one."""
    lock, error = None, None
    if ctx.is_main:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            lock = RunLock(directory, stale_s=stale_seconds(), flag=flag, kind=kind)
            lock.acquire()
        except RunLockError as e:
            lock, error = None, str(e)
        except OSError as e:
            lock, error = None, (f"{flag} {directory}: cannot be created or written ({e.strerror or e}); "
                                 f"fix its permissions or pass another {flag}.")
    error = du.broadcast_object(error)
    if error:
        raise RunLockError(str(error))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
