"""Stall watchdog (``--stall-timeout``): a rank that stops making progress ends the job in minutes, not 30.

A stalled rank (a hung NFS read, a stuck driver call, a deadlocked DataLoader worker, a stopped process) holds
every other rank in its next collective, where they would wait silently until the process group's 30-minute
timeout. Each rank runs a daemon thread that publishes a heartbeat record every few seconds to the job's
rendezvous store (c10d's TCPStore at MASTER_ADDR:MASTER_PORT, through a client of its own with a short timeout):
its host, pid, iteration, what it is doing, and when it last made progress (completed a training step or an
evaluation batch). When no rank has made progress for ``--stall-timeout`` seconds:

- every live rank writes the Python stacks of all its threads to ``OUT/stalls/rank<R>.txt``;
- the lowest live rank says in one line which ranks stopped responding (no heartbeat), or which are elsewhere
  than the others, and at which iteration; under SLURM it requeues the job (``scontrol requeue``), as a
  preemption is requeued, and the same command resumes from the last checkpoint;
- every live rank exits with status :data:`STALL_EXIT`.

Not watched: a run's first step (compiling, cuDNN autotuning, the first batches) and checkpoint writes. Host
clocks should agree within a few seconds (NTP), as the run lock also assumes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

#: Exit status of a rank that the watchdog ends (EX_TEMPFAIL: run the same command again).
STALL_EXIT = 75
#: The file in OUT/stalls/ that holds the line the reporting rank printed (the other ranks then stay quiet).
VERDICT = "verdict.txt"
#: What each phase of the loop is called in the one line.
PHASES = {"starting": "starting", "step": "in the training step", "data": "loading data",
          "eval": "evaluating", "checkpoint": "writing a checkpoint", "log": "logging"}


class Watchdog:
    """The heartbeat of one rank and the thread that watches all of them; ``progress()`` after every completed
    step or evaluation batch (cheap: two attribute writes)."""

    def __init__(self, timeout_s: float, out_dir: str | Path, rank: int = 0, world_size: int = 1):
        self.timeout = float(timeout_s)
        self.out = Path(out_dir)
        self.rank, self.world = rank, world_size
        # a stopped rank's heartbeat is missed after `grace` seconds, well inside the timeout
        self.interval = min(max(self.timeout / 10, 0.5), 15.0)
        self.grace = min(self.timeout / 2, max(3 * self.interval, 2.0))
        self.step, self.phase = 0, "starting"
        self.last_progress = time.time()
        self.armed = False  # from the end of the first step on
        self.paused = 0  # > 0 while a checkpoint is written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None  # the rendezvous store's client, from start() on when there are other ranks
        self._prefix = f"cityseg/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._host, self._pid = socket.gethostname(), os.getpid()

    # -- what the training loop calls ------------------------------------------------------------------
    def start(self) -> "Watchdog":
        """Start watching (a daemon thread)."""
        if self.world > 1:
            self._store = _client_store(self.interval)
        self._thread = threading.Thread(target=self._run, name="cityseg-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching (the run is over, or leaves through an error of its own)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5)

    def progress(self, step: int | None = None) -> None:
        """This rank completed a training step (``step``: the iteration it reached) or an evaluation batch."""
        self.last_progress = time.time()
        if step is not None:
            self.step = step
            self.armed = True

    def set_phase(self, phase: str) -> None:
        """What this rank does now (one of :data:`PHASES`), for the line that names a culprit."""
        self.phase = phase

    @contextlib.contextmanager
    def pause(self, phase: str = "checkpoint") -> Iterator[None]:
        """Not watched while inside (checkpoint writes); progress counts from the end."""
        before, self.phase = self.phase, phase
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.phase = before
            self.last_progress = time.time()

    # -- the thread ------------------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": self._host, "pid": self._pid, "step": self.step, "phase": self.phase,
                "progress": self.last_progress, "beat": time.time(), "armed": self.armed,
                "paused": self.paused > 0}

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/rank{rank}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._store is not None:
                    self._store.set(self._key(self.rank), json.dumps(self._record()))
            except Exception:  # the store's host stopped or left: judged below, when it matters
                pass
            if not self.armed or self.paused or time.time() - self.last_progress < self.timeout:
                continue
            verdict = self._verdict(self._gather())
            if verdict is not None and not self._stop.is_set():
                self._end(verdict)

    def _gather(self) -> list[dict[str, Any] | None] | None:
        """Every rank's last record (None for a rank that never published); None if the store is unreachable."""
        mine = self._record()
        if self._store is None:
            return [mine]
        records: list[dict[str, Any] | None] = []
        try:
            for r in range(self.world):
                if r == self.rank:
                    records.append(mine)
                elif self._store.check([self._key(r)]):
                    records.append(json.loads(self._store.get(self._key(r))))
                else:
                    records.append(None)
        except Exception:
            return None
        return records

    def _verdict(self, records: list[dict[str, Any] | None] | None) -> dict[str, Any] | None:
        """What the stall looks like (None: no stall, some rank made progress or is excused)."""
        now = time.time()
        if records is None:  # only this rank's own view
            return {"records": None, "silent": [], "live": [self._record()], "since": self.last_progress}
        live = [r for r in records if r is not None and now - r["beat"] < self.grace]
        if any(r["paused"] or not r["armed"] for r in live):
            return None  # a rank writes a checkpoint, or is still in its first step
        since = max(r["progress"] for r in live)
        if now - since < self.timeout:
            return None
        silent = [r if r is not None else {"rank": i} for i, r in enumerate(records)
                  if r is None or now - r["beat"] >= self.grace]
        return {"records": records, "silent": silent, "live": live, "since": since}

    def _end(self, verdict: dict[str, Any]) -> None:
        """Write this rank's stacks; the lowest live rank says what happened and requeues; exit."""
        stacks = self.out / "stalls" / f"rank{self.rank}.txt"
        try:
            write_stacks(stacks, f"rank {self.rank} on {self._host}, pid {self._pid}: iteration {self.step}, "
                                 f"{PHASES.get(self.phase, self.phase)}; no rank made progress for "
                                 f"{self.timeout:g} s")
        except OSError:
            pass
        speaker = min(r["rank"] for r in verdict["live"])
        if speaker == self.rank and not self._handled():
            line = self.describe(verdict)
            with contextlib.suppress(OSError):  # before the requeue, which ends the other ranks
                (self.out / "stalls" / VERDICT).write_text(line + "\n")
            requeued = requeue_slurm_job()
            message = f"error: {line}; {requeued}" if requeued else f"error: {line}"
            print(message, file=sys.stderr, flush=True)
            with contextlib.suppress(OSError), open(self.out / "train.log", "a") as log:
                log.write(message + "\n")
        else:
            time.sleep(min(2.0, self.interval))  # let the speaker print before the launcher stops the job
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STALL_EXIT)

    def _handled(self) -> bool:
        """True when another rank has already said what stalled, after this rank's last progress: this rank was
        the one that stopped, and wakes now (SLURM continues a stopped task to end it), with nothing to add but
        its stacks."""
        try:
            return (self.out / "stalls" / VERDICT).stat().st_mtime >= self.last_progress
        except OSError:
            return False

    def describe(self, verdict: dict[str, Any]) -> str:
        """The one line: how long, since which iteration, who, where the stacks are, how to resume."""
        step = max(r["step"] for r in verdict["live"])
        head = (f"stalled: no rank completed a training step or an evaluation batch for {self.timeout:g} s "
                f"(--stall-timeout) after iteration {step}")
        if verdict["records"] is None:
            who = (f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} did "
                   f"not answer either, so its host (rank 0's node, or the launcher's) stopped too")
        elif verdict["silent"]:
            who = _ranks(verdict["silent"]) + " stopped responding (no heartbeat)"
        else:
            who = _odd_ones(verdict["live"])
        return (f"{head}; {who}. Python stacks of the live ranks: {self.out / 'stalls'}/rank<R>.txt. Exiting with "
                f"status {STALL_EXIT}; run the same command to resume from {self.out / 'last.pt'}")


def _ranks(records: list[dict[str, Any]]) -> str:
    """``rank 1 (node2, pid 123)`` or ``ranks 1 (node2, pid 123), 3 (...)``."""
    parts = [f"{r['rank']} ({r['host']}, pid {r['pid']})" if "host" in r else f"{r['rank']} (never reported)"
             for r in records]
    return ("rank " if len(parts) == 1 else "ranks ") + ", ".join(parts)


def _odd_ones(live: list[dict[str, Any]]) -> str:
    """Which ranks are somewhere else than the most of them (all heartbeats arrive: a hang inside a rank)."""
    where = Counter((r["step"], r["phase"]) for r in live)
    (step, phase), _ = where.most_common(1)[0]
    odd = [r for r in live if (r["step"], r["phase"]) != (step, phase)]
    if not odd or len(where) > 2:
        return (f"every rank still answers; they are at iteration {step} {PHASES.get(phase, phase)}, and their "
                f"stacks show where each waits")
    first = odd[0]
    return (f"{_ranks(odd)} {'is' if len(odd) == 1 else 'are'} at iteration {first['step']} "
            f"{PHASES.get(first['phase'], first['phase'])} while the others are at iteration {step} "
            f"{PHASES.get(phase, phase)}")


def write_stacks(path: Path, header: str) -> None:
    """The Python stack of every thread of this process, into ``path``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [header, ""]
    for ident, frame in sys._current_frames().items():
        lines.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:")
        lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def requeue_slurm_job() -> str:
    """Under SLURM, requeue this job (every task is ended, the job starts again and resumes); what happened, in
    words ('' outside SLURM)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job} ({e}); submit it again"
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        return f"could not requeue SLURM job {job} ({reason[0] if reason else done.returncode}); submit it again"
    return f"requeued SLURM job {job}, which resumes there"


def _client_store(interval: float) -> Any:
    """A client of the job's rendezvous store of its own, whose operations give up after a few seconds."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=max(5.0, 2 * interval))
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timeout, wait_for_workers=False)
