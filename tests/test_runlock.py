"""One owner per run directory: the lock against real processes, dead holders and holders on other hosts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from cityseg import checkpoint as ckpt
from cityseg.runlock import LOCK_NAME, STALE_S, RunLock, RunLockError
from conftest import assert_same_training_state, run_script, start_training, train_args, wait_for_iteration


def _foreign_lock(directory, age_s: float, host: str = "node-17") -> dict:
    """A lock written by a run on another host whose last heartbeat was ``age_s`` seconds ago."""
    record = {"host": host, "boot_id": "another-boot", "pid_ns": "pid:[1]", "pid": 4242, "start_ticks": 1,
              "started": "2026-11-26 09:00:00", "token": "f0reign"}
    path = directory / LOCK_NAME
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return record


def _quiet(message: str) -> None:
    pass


# -- the lock alone, with short times ----------------------------------------------------------------------
@pytest.mark.quick
def test_a_live_holder_on_this_host_is_refused_with_its_name(tmp_path):
    holder = RunLock(tmp_path, say=_quiet)
    holder.acquire()
    try:
        with pytest.raises(RunLockError) as e:
            RunLock(tmp_path, say=_quiet).acquire()
        message = str(e.value)
        assert f"--out-dir {tmp_path}" in message and f"pid {os.getpid()}" in message
        assert f"host {holder.record['host']}" in message and holder.record["started"] in message
    finally:
        holder.release()
    assert not (tmp_path / LOCK_NAME).exists()  # a clean stop releases it
    assert sorted(os.listdir(tmp_path)) == []  # and the refused attempt left nothing behind


def test_a_dead_holder_on_this_host_is_replaced_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    first = RunLock(tmp_path, say=_quiet)
    first.record.update(pid=int(dead))  # as if written by that process, which has exited
    assert first._create()
    said = []
    t0 = time.monotonic()
    RunLock(tmp_path, say=said.append).acquire()
    assert time.monotonic() - t0 < 1 and f"pid {dead}" in said[0] and "gone" in said[0]


def test_a_reused_pid_does_not_keep_a_dead_holder_alive(tmp_path):
    # The pid is alive (it is this test's), but its start time is not the holder's: another process got it.
    stale = RunLock(tmp_path, say=_quiet)
    stale.record.update(start_ticks=stale.record["start_ticks"] - 1)
    assert stale._create()
    RunLock(tmp_path, say=_quiet).acquire()  # taken over, no error


def test_another_hosts_lock_is_taken_once_its_heartbeat_is_stale(tmp_path):
    _foreign_lock(tmp_path, age_s=STALE_S + 1)
    t0 = time.monotonic()
    lock = RunLock(tmp_path, say=_quiet)
    lock.acquire()
    assert time.monotonic() - t0 < 1
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.record["token"]


def test_another_hosts_recent_lock_is_watched_for_at_most_the_stale_time(tmp_path):
    _foreign_lock(tmp_path, age_s=0)
    t0 = time.monotonic()
    RunLock(tmp_path, heartbeat_s=0.4, stale_s=2.0, say=_quiet).acquire()  # nobody beats: taken after 2 s
    assert 1.8 <= time.monotonic() - t0 < 4


def test_another_hosts_lock_whose_heartbeat_moves_is_refused(tmp_path):
    _foreign_lock(tmp_path, age_s=0)
    stop = threading.Event()

    def beat():  # the other host's run, alive
        while not stop.wait(0.3):
            os.utime(tmp_path / LOCK_NAME)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockError, match="host node-17, pid 4242"):
            RunLock(tmp_path, heartbeat_s=1.0, stale_s=30.0, say=_quiet).acquire()
        assert time.monotonic() - t0 < 3  # refused as soon as the heartbeat moved, not after 30 s
    finally:
        stop.set()
        thread.join()


def test_a_holder_that_lost_its_lock_stops(tmp_path):
    lost = []
    holder = RunLock(tmp_path, heartbeat_s=0.2, say=_quiet, on_lost=lost.append)
    holder.acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-3", "pid": 7, "started": "then", "token": "x"}))
    time.sleep(0.8)
    holder.release()
    assert lost and "lost" in lost[0] and "host node-3, pid 7" in lost[0]
    assert (tmp_path / LOCK_NAME).exists()  # the new owner's lock is not released by the old owner


# -- through train.py ------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_and_the_first_ends_as_a_lone_run(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = start_training(train_args(synthetic_root, out), 0, log=log)
        wait_for_iteration(out, 4, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold still, so that anything the second run wrote would show
        try:
            before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
            second = run_script("train.py", train_args(synthetic_root, out), check=False)
            after = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"error: --out-dir {out}: another training run owns this directory "
                                    f"(host {os.uname().nodename}, pid {first.pid}, started ")
    assert after == before  # the refused run changed nothing
    assert_same_training_state(reference(0), out)
    assert not (out / LOCK_NAME).exists()


def test_a_sigkilled_holder_does_not_block_the_restart(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    first = start_training(train_args(synthetic_root, out), 0, log=subprocess.DEVNULL)
    wait_for_iteration(out, 8, first)  # past the checkpoint at 6
    first.kill()
    first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # left behind by the dead run
    k = ckpt.load(out / "last.pt")["iteration"]
    again = run_script("train.py", train_args(synthetic_root, out))
    assert f"took over {out / LOCK_NAME} from a run that is gone" in again.stdout
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout
    assert_same_training_state(reference(0), out)


def test_a_stale_lock_from_another_host_is_taken_after_the_documented_time(synthetic_root, tmp_path, reference):
    # The other host's last heartbeat was STALE_S - 6 seconds ago and never moves: taken over 6 s later, not
    # earlier (the run starts in about 2 s and then watches the rest of the time).
    out = tmp_path / "run"
    out.mkdir()
    _foreign_lock(out, age_s=STALE_S - 6)
    t0 = time.monotonic()
    proc = run_script("train.py", train_args(synthetic_root, out))
    assert f"{out / LOCK_NAME} is held by host node-17, pid 4242" in proc.stdout and "watching it" in proc.stdout
    assert "took over" in proc.stdout and time.monotonic() - t0 >= 5.5
    assert_same_training_state(reference(0), out)


def test_evaluate_needs_no_lock_and_never_touches_a_running_trainings_files(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference(0), out)
    lock = RunLock(out, say=_quiet)  # a training run owns the directory right now
    lock.acquire()
    try:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        run_script("evaluate.py", ["--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root),
                                   "--device", "cpu", "--workers", "0", "--wandb", "offline", "--official"])
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    finally:
        lock.release()
    assert {p: after[p] for p in before} == before  # every file the training had is as it was
    added = {str(p.relative_to(out)).split("/")[0] for p in set(after) - set(before)}
    assert {"metrics.json", "eval.log", "eval_metrics.jsonl", "predictions"} <= added
    assert not added & {"train.log", "metrics.jsonl", "config.yaml", "last.pt", "best.pt", LOCK_NAME}
