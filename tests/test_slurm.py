"""submitit jobs on the real local SLURM cluster of slurm/local_cluster.sh (tests marked ``slurm``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityseg.checkpoint import load
from conftest import REPO, TINY
from wandb_log import read_run

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


def test_usr2_requeues_and_resumes_the_same_run(synthetic_root, tmp_path):
    out, max_iters = tmp_path / "run", 600
    proc = submit([*CPU_TASKS, "--folder", str(tmp_path / "logs" / "%j")],
                  _train_args(synthetic_root, out, "--max-iters", str(max_iters), "--ckpt-every", "100",
                              "--log-every", "5", "--wandb", "offline"))
    jid = job_id(proc.stdout)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if rows and json.loads(rows[-1])["iteration"] >= 20:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job did not start training in time")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        log = (out / "train.log").read_text()
        if "done:" in log:
            break
        time.sleep(2)
    else:
        pytest.fail(f"job {jid} did not finish after the requeue:\n{(out / 'train.log').read_text()}")
    log = (out / "train.log").read_text()
    stopped = re.search(r"Stopped by SIGUSR2 at iteration (\d+)", log)
    assert stopped, log
    assert f"Resumed from {out / 'last.pt'} at iteration {stopped.group(1)}" in log
    state = load(out / "last.pt")
    assert state["iteration"] == max_iters
    run = read_run(out / "wandb")  # the requeued job continued the same W&B run
    assert len(run["ids"]) == 2 and set(run["ids"]) == {state["wandb_id"]}
    steps = [s for s, row in run["history"] if "train/loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == max_iters


def test_evaluation_job_writes_metrics(synthetic_root, tmp_path):
    out = tmp_path / "run"
    submit([*CPU_TASKS, "--folder", str(tmp_path / "logs" / "%j"), "--wait"],
           _train_args(synthetic_root, out, "--max-iters", "2"))
    submit([*CPU_TASKS, "--script", "evaluate", "--folder", str(tmp_path / "elogs" / "%j"), "--wait"],
           ["--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root), "--out-dir",
            str(tmp_path / "eval"), "--device", "cpu", "--workers", "0"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 5 and 0 <= metrics["miou"] <= 1
