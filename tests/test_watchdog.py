"""The stall watchdog (--stall-timeout): a stopped rank ends the job within the timeout, with stacks and the
culprit named; the first step and checkpoint writes never trip it; the same command resumes."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from cityseg.watchdog import STALL_EXIT, Watchdog
from conftest import (REPO, assert_same_training_state, run_script, start_training, train_args, wait_for_iteration,
                      worker_pid)

TIMEOUT = 5  # seconds of --stall-timeout in these tests


def test_a_stopped_rank_ends_the_job_within_the_timeout_and_the_same_command_resumes(synthetic_root, tmp_path,
                                                                                       reference):
    out = tmp_path / "run"
    args = train_args(synthetic_root, out, "--stall-timeout", str(TIMEOUT))
    with open(tmp_path / "first.log", "w") as log:
        agent = start_training(args, 2, log=log)
        wait_for_iteration(out, 8, agent)
        rank0, rank1 = worker_pid(agent.pid, 0), worker_pid(agent.pid, 1)
        os.kill(rank1, signal.SIGSTOP)  # what a hung file system or a stuck driver call looks like from outside
        stopped = time.monotonic()
        try:
            while _alive(rank0) and time.monotonic() - stopped < TIMEOUT + 30:
                time.sleep(0.1)
            ended = time.monotonic() - stopped
        finally:
            os.kill(rank1, signal.SIGKILL)
        agent.wait(timeout=120)
    assert ended <= TIMEOUT + 4, f"rank 0 ran on {ended:.1f} s after rank 1 stopped"
    text = (tmp_path / "first.log").read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert re.search(rf"no rank completed a training step or an evaluation batch for {TIMEOUT} s .*after iteration "
                     rf"\d+; rank 1 \(\S+, pid {rank1}\) stopped responding", errors[0]), errors[0]
    assert "exitcode  : 75" in text  # rank 0's status, in torchrun's summary
    stacks = (out / "stalls" / "rank0.txt").read_text()
    # rank 0's main thread waits inside a collective for rank 1, and the file says where in the loop it was
    main = stacks.split("Thread MainThread")[1].split("\nThread ")[0]
    assert "distributed_c10d.py" in main and "cityseg/engine.py" in main, main
    assert stacks.startswith(f"rank 0 on ") and f"pid {rank0}: iteration " in stacks.splitlines()[0]
    assert not (out / "stalls" / "rank1.txt").exists()  # a stopped process writes nothing
    assert errors[0].startswith("error: " + (out / "stalls" / "verdict.txt").read_text().strip())  # kept beside
    # the same command resumes from the last checkpoint and ends where an uninterrupted run ends
    second = run_script("train.py", args, nproc=2)
    assert "Resumed from" in second.stdout
    assert_same_training_state(out, reference(2))


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _slow_steps_run(args: list[str], slow: tuple[int, ...], logs: Path) -> None:
    """train.py's main in a process forked from this one (the watchdog ends a process with os._exit), with
    2.5 s more after each step of ``slow`` and in every checkpoint write."""
    import time as clock

    from cityseg import engine
    from conftest import call_main

    step, save = engine.Trainer.train_step, engine.ckpt.save_periodic

    def train_step(self, micro):
        step(self, micro)
        if self.iteration + 1 in slow:
            clock.sleep(2.5)

    def slow_save(*a, **k):
        clock.sleep(2.5)
        return save(*a, **k)

    engine.Trainer.train_step, engine.ckpt.save_periodic = train_step, slow_save
    err = open(logs / "stderr", "w")
    os.dup2(err.fileno(), 2)
    sys.stderr = sys.stdout = err
    status = call_main("train", args)
    err.flush()
    os._exit(status)


@pytest.mark.parametrize("slow, status", [((1,), 0), ((3,), STALL_EXIT)], ids=["first-step", "third-step"])
def test_the_first_step_and_checkpoint_writes_are_not_stalls_but_a_slow_later_step_is(synthetic_root, tmp_path,
                                                                                          slow, status):
    """One process, --stall-timeout 1: a 2.5 s first step and 2.5 s checkpoint writes pass; a 2.5 s third step
    ends the run with status 75 and its stack."""
    import multiprocessing

    out = tmp_path / "run"
    args = train_args(synthetic_root, out, "--stall-timeout", "1", "--max-iters", "4", "--ckpt-every", "2",
                      "--eval-every", "0")
    run = multiprocessing.get_context("fork").Process(target=_slow_steps_run, args=(args, slow, tmp_path))
    run.start()
    run.join(120)
    stderr = (tmp_path / "stderr").read_text()
    assert run.exitcode == status, stderr
    if status == 0:
        assert "done: 4 iterations" in (out / "train.log").read_text() and not (out / "stalls").exists()
        return
    assert stderr.count("error:") == 1 and "after iteration 2" in stderr, stderr
    assert "for 1 s (--stall-timeout)" in stderr
    assert "every rank still answers; they are at iteration 2 in the training step" in stderr
    assert "in train_step" in (out / "stalls" / "rank0.txt").read_text()  # where it was: the slow step


def _record(rank, step=10, phase="step", progress_age=100.0, beat_age=0.1, armed=True, paused=False):
    now = time.time()
    return {"rank": rank, "host": f"node{rank}", "pid": 100 + rank, "step": step, "phase": phase,
            "progress": now - progress_age, "beat": now - beat_age, "armed": armed, "paused": paused}


@pytest.mark.quick
def test_the_verdict_names_the_silent_or_odd_ranks_and_excuses_checkpoints_and_first_steps(tmp_path):
    dog = Watchdog(60, tmp_path, rank=0, world_size=4)
    assert dog.grace < dog.timeout
    line = dog.describe(dog._verdict([_record(0), _record(1), _record(2, beat_age=90), _record(3, beat_age=95)]))
    assert "ranks 2 (node2, pid 102), 3 (node3, pid 103) stopped responding" in line
    assert "after iteration 10" in line and "resume from" in line
    line = dog.describe(dog._verdict([_record(0), _record(1, step=9, phase="data"), _record(2), _record(3)]))
    assert ("rank 1 (node1, pid 101) is at iteration 9 loading data while the others are at iteration 10 in the "
            "training step") in line
    assert "every rank still answers" in dog.describe(dog._verdict([_record(r) for r in range(4)]))
    # no verdict: a rank made progress within the timeout, writes a checkpoint, or is in its first step
    assert dog._verdict([_record(0), _record(1, progress_age=10), _record(2), _record(3)]) is None
    assert dog._verdict([_record(0), _record(1, paused=True), _record(2), _record(3)]) is None
    assert dog._verdict([_record(0), _record(1), _record(2, armed=False), _record(3)]) is None
    # ... unless that rank stopped answering itself
    assert dog._verdict([_record(0), _record(1, paused=True, beat_age=90), _record(2), _record(3)]) is not None
    # a rank that never published is silent too
    assert "rank 3 (never reported) stopped responding" in dog.describe(
        dog._verdict([_record(0), _record(1), _record(2), None]))
