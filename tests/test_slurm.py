"""submitit jobs on the real local SLURM cluster of slurm/local_cluster.sh (tests marked ``slurm``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityseg.checkpoint import load
from conftest import REPO, TINY, assert_matches_reference, reference_scores

# one cluster: this file and its sibling run on one pytest worker, one after the other (conftest.ONE_CLUSTER)
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The local cluster must answer; in CI its absence is a failure, elsewhere a skip."""
    ok = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster: CI must run `bash slurm/local_cluster.sh up` before the tests")
        pytest.skip("no SLURM cluster here (start one with `bash slurm/local_cluster.sh up`)")


def submit(cluster_args, entry_args, check=True, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "slurm/submit.py", *cluster_args, "--", *entry_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def job_id(stdout: str) -> str:
    return re.search(r"Submitted job (\d+)", stdout).group(1)


def _train_args(root, out, *extra):
    return ["--data-root", str(root), "--out-dir", str(out), *TINY, "--batch-size", "2", "--eval-every", "0",
            "--num-pictures", "0", *extra]


CPU_TASKS = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--timeout-min", "20", "--job-name", "cityseg-test"]


def test_two_task_training_job_completes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    proc = submit([*CPU_TASKS, "--folder", str(tmp_path / "logs" / "%j"), "--wait"],
                  _train_args(synthetic_root, out, "--max-iters", "6", "--ckpt-every", "3"))
    jid = job_id(proc.stdout)
    state = load(out / "last.pt")
    assert state["iteration"] == 6 and state["world_size"] == 2
    assert "on 2 x cpu" in (tmp_path / "logs" / jid / f"{jid}_0_log.out").read_text()


def test_evaluation_job_writes_metrics(synthetic_root, trained, tmp_path):
    submit([*CPU_TASKS, "--script", "evaluate", "--folder", str(tmp_path / "elogs" / "%j"), "--wait"],
           ["--checkpoint", str(trained), "--data-root", str(synthetic_root), "--out-dir", str(tmp_path / "eval"),
            "--device", "cpu", "--workers", "0"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 5
    assert_matches_reference(metrics, reference_scores(trained, synthetic_root))


# -- requests and clusters a new user gets wrong --------------------------------------------------------------
def _node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])


def _cluster_up(env: dict) -> None:
    proc = subprocess.run(["bash", "slurm/local_cluster.sh", "up"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cluster_up_counts_the_machines_cpus_whatever_omp_num_threads_says(tmp_path):
    # nproc honours OMP_NUM_THREADS, which HPC login shells often set to 1.
    conf = Path("/etc/slurm/slurm.conf").read_text()
    _cluster_up({**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"})
    assert _node_cpus() == os.cpu_count()
    assert Path("/etc/slurm/slurm.conf").read_text() == conf  # nothing to change, nothing restarted
    # And `up` never shrinks a running cluster, even when the count it makes now is lower.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "slurmd").write_text('#!/bin/sh\n[ "$1" = -C ] && { echo "NodeName=x CPUs=1 RealMemory=1000"; exit 0; }\n'
                                 'exec /usr/sbin/slurmd "$@"\n')
    (fake / "slurmd").chmod(0o755)
    _cluster_up({**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert _node_cpus() == os.cpu_count() and Path("/etc/slurm/slurm.conf").read_text() == conf


@pytest.mark.parametrize("request_args, exceeds", [
    (["--tasks-per-node", str(os.cpu_count() + 2), "--cpus-per-task", "1"],
     f"CPUs on each node but the nodes of partition debug have {os.cpu_count()}"),
    (["--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1"], "it asks for 2 nodes but partition debug"),
], ids=["cpus", "nodes"])
def test_a_request_that_can_never_start_is_reported_and_cancelled(synthetic_root, tmp_path, request_args, exceeds):
    proc = submit([*request_args, "--timeout-min", "5", "--folder", str(tmp_path / "%j")],
                  _train_args(synthetic_root, tmp_path / "run", "--max-iters", "2"), check=False, timeout=120)
    jid = job_id(proc.stdout)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: job {jid} can never start (pending, reason Partition"), proc.stderr
    assert exceeds in proc.stderr and proc.stderr.strip().endswith("It was cancelled.")
    queue = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    assert queue in ("", "CANCELLED", "COMPLETING"), queue


def test_a_stopped_task_is_found_by_the_watchdog_and_the_job_requeues_and_resumes(synthetic_root, tmp_path):
    """A task of a submitit job stops (SIGSTOP: what a hung file system looks like): the other task ends within
    --stall-timeout, requeues the job, and the requeued job resumes from the last checkpoint to the end."""
    out, max_iters = tmp_path / "run", 50  # the stop comes at iteration 10 or soon after
    submit([*CPU_TASKS, "--folder", str(tmp_path / "logs" / "%j")],
           _train_args(synthetic_root, out, "--max-iters", str(max_iters), "--ckpt-every", "10", "--log-every", "5",
                       "--stall-timeout", "5"))
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if rows and json.loads(rows[-1])["iteration"] >= 10:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job did not start training in time")
    rank1 = int(re.search(r"rank 1 on \S+ \(cpu, pid (\d+)\)", (out / "train.log").read_text()).group(1))
    os.kill(rank1, signal.SIGSTOP)
    deadline = time.time() + 600
    while time.time() < deadline and "done:" not in (out / "train.log").read_text():
        time.sleep(2)
    log = (out / "train.log").read_text()
    assert "done:" in log, log
    said = [line for line in log.splitlines() if "stalled:" in line]
    assert len(said) == 1 and f"rank 1 (" in said[0] and f"pid {rank1}) stopped responding" in said[0], log
    assert "requeued SLURM job" in said[0], said[0]
    assert (out / "stalls" / "rank0.txt").is_file()
    # SLURM continues the stopped task to end it: it writes its stacks, but leaves the saying to rank 0
    assert "stalled:" not in "".join(p.read_text() for p in (tmp_path / "logs").rglob("*_1_log.err"))
    resumed = re.search(r"Resumed from \S+ at iteration (\d+)", log)
    assert resumed and int(resumed.group(1)) % 10 == 0, log
    assert load(out / "last.pt")["iteration"] == max_iters
