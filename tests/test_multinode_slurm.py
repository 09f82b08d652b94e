"""Multi-node on a real SLURM cluster of 2 nodes on this machine (slurm/local_cluster.sh up --nodes 2): each node
a network + UTS namespace with its own host name, address and slurmd. Training through submitit, sbatch + srun and
torchrun under srun, preemption and the run lock across hosts, evaluation, and the setups that cannot work.

Marked ``slurm``: they need root (namespaces, daemons), which CI has; elsewhere they skip. The module starts the
2-node cluster once and puts the one-node cluster back at the end, for tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load
from conftest import REPO, TINY, run_script

# one cluster: this file and its sibling run on one pytest worker, one after the other (conftest.ONE_CLUSTER)
pytestmark = pytest.mark.slurm
CLUSTER = ["bash", "slurm/local_cluster.sh"]
# the sbatch templates call `python`: this interpreter's
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
       "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
ENV.pop("MASTER_PORT", None)
ENV.pop("MASTER_ADDR", None)


@pytest.fixture(scope="module", autouse=True)
def two_nodes():
    if os.geteuid() != 0 or not shutil.which("ip"):
        if os.environ.get("CI"):
            pytest.fail("CI must run as root: the 2-node cluster needs network namespaces")
        pytest.skip("needs root for network namespaces and SLURM daemons")
    up = subprocess.run([*CLUSTER, "up", "--nodes", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    subprocess.run([*CLUSTER, "up"], cwd=REPO, capture_output=True, text=True, timeout=600)


def on_node(node: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLUSTER, "exec", node, *cmd], cwd=REPO, capture_output=True, text=True, timeout=60,
                          **kwargs)


def tx_bytes(node: str) -> int:
    """Bytes the node has sent through its interface on the bridge (/proc/net/dev is its network namespace's)."""
    line = next(x for x in on_node(node, "cat", "/proc/net/dev").stdout.splitlines() if x.strip().startswith("eth0:"))
    return int(line.split(":", 1)[1].split()[8])


def wait_job(jid: str, timeout: float = 300) -> str:
    """Wait until the job has left the queue; its final state (from scontrol while it is remembered)."""
    end = time.time() + timeout
    while time.time() < end:
        if not subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip():
            state = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
            found = re.search(r"JobState=(\w+)", state)
            return found.group(1) if found else "GONE"
        time.sleep(0.5)
    subprocess.run(["scancel", jid])
    raise AssertionError(f"job {jid} still queued or running after {timeout} s")


def submit(cluster_args, entry_args, env=None, check=True):
    proc = subprocess.run([sys.executable, "slurm/submit.py", "--cpus-per-task", "1", "--timeout-min", "20",
                           *cluster_args, "--", *entry_args], cwd=REPO, env=env or ENV, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, re.search(r"Submitted job (\d+)", proc.stdout).group(1)


def sbatch(script: str, args: list[str], options: list[str], env=None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *options, script, *args], cwd=REPO, env=env or ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _train(root, out, *extra):
    return ["--data-root", str(root), "--out-dir", str(out), *TINY, "--batch-size", "2", "--lr", "0.05",
            "--eval-every", "0", "--num-pictures", "0", "--seed", "7", *extra]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load(a / "last.pt"), load(b / "last.pt")
    return x["iteration"] == y["iteration"] and all(torch.equal(v, y["model"][k]) for k, v in x["model"].items())


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    """torchrun --nproc_per_node=2 on this host, 6 iterations: what every 2-rank job must equal bit for bit."""
    out = tmp_path_factory.mktemp("mn_reference")
    run_script("train.py", _train(synthetic_root, out, "--max-iters", "6"), nproc=2)
    return out


# -- training ------------------------------------------------------------------------------------------------
def test_two_nodes_of_one_task_through_submitit_train_like_torchrun_on_one_host(synthetic_root, reference,
                                                                                 tmp_path):
    out = tmp_path / "run"
    before = tx_bytes("node2")
    _, jid = submit(["--nodes", "2", "--tasks-per-node", "1", "--folder", str(tmp_path / "logs" / "%j"),
                     "--wait"], _train(synthetic_root, out, "--max-iters", "6"))
    sent = tx_bytes("node2") - before
    log = (out / "train.log").read_text()
    port = random.Random(jid).randint(20000, 60000)  # submitit's port for this job id
    assert f"placement (rendezvous node1:{port}): rank 0 on node1 (cpu, " in log and "; rank 1 on node2 (cpu, " in log
    assert same_weights(out, reference)
    params = sum(v.numel() for k, v in load(out / "last.pt")["model"].items() if not k.endswith("tracked"))
    assert sent > 6 * params * 4 * 0.9, sent  # each step's gradients left node2 over the bridge (not loopback)


def test_two_nodes_of_two_tasks_through_submitit(synthetic_root, tmp_path):
    out = tmp_path / "run"
    submit(["--nodes", "2", "--tasks-per-node", "2", "--folder", str(tmp_path / "logs" / "%j"), "--wait"],
           _train(synthetic_root, out, "--max-iters", "2", "--batch-size", "1"))
    log = (out / "train.log").read_text()
    placed = re.findall(r"rank (\d) on (node\d)", log.split("placement")[1].splitlines()[0])
    assert sorted(placed) == [("0", "node1"), ("1", "node1"), ("2", "node2"), ("3", "node2")], log
    assert load(out / "last.pt")["world_size"] == 4


@pytest.mark.parametrize("script", ["train.sbatch", "torchrun.sbatch"])
def test_sbatch_templates_on_two_nodes_train_like_torchrun_on_one_host(synthetic_root, reference, tmp_path, script):
    out = tmp_path / "run"
    options = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=20",
               f"--output={tmp_path}/%j.out"]
    jid = sbatch(f"slurm/{script}", _train(synthetic_root, out, "--max-iters", "6"), options,
                 env={**ENV, "NPROC_PER_NODE": "1"})
    assert wait_job(jid) in ("COMPLETED", "GONE"), (tmp_path / f"{jid}.out").read_text()
    assert same_weights(out, reference), (tmp_path / f"{jid}.out").read_text()
    hosts = re.findall(r"rank \d on (node\d)", (out / "train.log").read_text())
    assert sorted(hosts) == ["node1", "node2"]


# -- preemption and the run lock across hosts ------------------------------------------------------------------
def _wait_for_iteration(out: Path, it: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if any(json.loads(r)["iteration"] >= it for r in rows if r.endswith("}")):
            return
        time.sleep(0.3)
    raise AssertionError(f"no iteration {it} in {out}")


def test_usr2_requeues_a_two_node_job_which_resumes_bitwise(synthetic_root, tmp_path):
    """SLURM's USR2 before the time limit (submit.py asks for it): every rank saves at one iteration, rank 0's
    submitit requeues the job, and the requeued job resumes there: the same weights as an uninterrupted run, and
    the same W&B run, every logged step once."""
    from wandb_log import read_run

    out, iters = tmp_path / "run", 40
    args = _train(synthetic_root, out, "--max-iters", str(iters), "--log-every", "1", "--ckpt-every", "1000",
                  "--wandb", "offline")
    _, jid = submit(["--nodes", "2", "--tasks-per-node", "1", "--folder", str(tmp_path / "logs" / "%j")], args)
    _wait_for_iteration(out, 5)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    end = time.time() + 300
    while "done:" not in ((out / "train.log").read_text() if (out / "train.log").exists() else ""):
        assert time.time() < end, (out / "train.log").read_text()
        time.sleep(1)
    log = (out / "train.log").read_text()
    stopped = re.search(r"Stopped by SIGUSR2 at iteration (\d+)", log)
    assert stopped and f"Resumed from {out / 'last.pt'} at iteration {stopped.group(1)}" in log, log
    whole = tmp_path / "whole"
    run_script("train.py", _train(synthetic_root, whole, "--max-iters", str(iters), "--log-every", "1",
                                  "--ckpt-every", "1000"), nproc=2)
    assert same_weights(out, whole)
    state = load(out / "last.pt")
    run = read_run(out / "wandb")  # the requeued job continued the same W&B run
    assert len(run["ids"]) == 2 and set(run["ids"]) == {state["wandb_id"]}
    assert [s for s, row in run["history"] if "train/loss" in row] == list(range(1, iters + 1))


def test_a_killed_two_node_job_leaves_a_lock_that_another_host_takes_over_once_stale(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = _train(synthetic_root, out, "--max-iters", "400", "--log-every", "1", "--ckpt-every", "5")
    _, jid = submit(["--nodes", "2", "--tasks-per-node", "1", "--folder", str(tmp_path / "logs" / "%j")], args)
    _wait_for_iteration(out, 6)
    # SIGKILL to every task of the job's step (no handler runs: the lock stays behind). scancel signals a step
    # through the nodes' slurmd, which this host cannot reach: it runs on a node.
    assert on_node("node1", "scancel", "--signal=KILL", f"{jid}.0").returncode == 0
    wait_job(jid)
    lock = json.loads((out / "run.lock").read_text())
    assert lock["host"] == "node1"
    # The same run, resubmitted on node2 alone: its rank 0 is on another host than the lock's, which can only
    # tell the holder is dead by its heartbeat standing still (20 s here, CITYSEG_LOCK_STALE_S; 60 s for real, as
    # tests/test_runlock.py checks): it watches the lock until it is that old, then takes over.
    shorter = _train(synthetic_root, out, "--max-iters", "12", "--log-every", "1", "--ckpt-every", "5")
    _, again = submit(["--nodes", "1", "--tasks-per-node", "2", "--nodelist", "node2", "--folder",
                       str(tmp_path / "logs2" / "%j"), "--wait"], shorter, env={**ENV, "CITYSEG_LOCK_STALE_S": "20"})
    said = (tmp_path / "logs2" / again / f"{again}_0_log.out").read_text()  # rank 0's output
    assert f"{out / 'run.lock'} is held by host node1" in said and "watching it for up to" in said, said
    assert f"took over {out / 'run.lock'} from a run that is gone (host node1" in said, said
    log = (out / "train.log").read_text()
    assert re.search(rf"Resumed from {out / 'last.pt'} at iteration \d+", log) and "rank 0 on node2" in log
    assert load(out / "last.pt")["iteration"] == 12 and not (out / "run.lock").exists()


# -- evaluation ------------------------------------------------------------------------------------------------
def test_evaluation_on_two_nodes_gives_the_metrics_of_one_process(synthetic_root, reference, tmp_path):
    common = ["--checkpoint", str(reference / "last.pt"), "--data-root", str(synthetic_root), "--device", "cpu",
              "--workers", "0", "--num-pictures", "0"]
    submit(["--script", "evaluate", "--nodes", "2", "--tasks-per-node", "1", "--folder",
            str(tmp_path / "logs" / "%j"), "--wait"], [*common, "--out-dir", str(tmp_path / "two")])
    run_script("evaluate.py", [*common, "--out-dir", str(tmp_path / "one")])
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert {k: v for k, v in two.items() if k != "checkpoint"} == {k: v for k, v in one.items() if k != "checkpoint"}


# -- setups that cannot work: one line each, no hang ------------------------------------------------------------
def _task_errors(logs: Path) -> list[str]:
    return [line for f in sorted(logs.rglob("*.err")) for line in f.read_text().splitlines()
            if line.startswith("error: ")]


def test_a_node_whose_name_resolves_to_loopback_is_one_line(synthetic_root, tmp_path):
    hosts = Path("/etc/netns/cityseg-node2/hosts")
    original = hosts.read_text()
    try:
        with open(hosts, "r+") as f:  # in place: the node sees this file through a bind mount
            f.write(original.replace("10.213.0.12 node2", "127.0.1.1 node2"))
            f.truncate()
        t0 = time.monotonic()
        proc, jid = submit(["--nodes", "2", "--tasks-per-node", "1", "--folder", str(tmp_path / "logs" / "%j"),
                            "--wait"], _train(synthetic_root, tmp_path / "run", "--max-iters", "2"), check=False)
    finally:
        with open(hosts, "r+") as f:
            f.write(original)
            f.truncate()
    assert time.monotonic() - t0 < 120
    errors = _task_errors(tmp_path / "logs")
    assert errors == ["error: the ranks run on 2 hosts but node2 (127.0.1.1) resolves its own name to a loopback "
                      "address, which the other hosts cannot reach; set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME "
                      "on GPUs) to the network interface that connects the nodes, e.g. GLOO_SOCKET_IFNAME=eth0, or "
                      "map each node's name to its network address in /etc/hosts."], errors
    assert proc.returncode == 1 and f"error: job {jid} failed: {errors[0][len('error: '):]}" in proc.stderr


def test_a_taken_master_port_is_one_line_and_the_other_rank_gives_up_in_time(synthetic_root, tmp_path):
    port = 29517
    holder = subprocess.Popen([*CLUSTER, "exec", "node1", sys.executable, "-c",
                               f"import socket, time; s = socket.socket(); s.bind(('0.0.0.0', {port})); s.listen(); "
                               f"print('ok', flush=True); time.sleep(300)"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        submit(["--nodes", "2", "--tasks-per-node", "1", "--folder", str(tmp_path / "logs" / "%j"), "--wait"],
               _train(synthetic_root, tmp_path / "run", "--max-iters", "2"),
               env={**ENV, "MASTER_PORT": str(port), "CITYSEG_RDZV_TIMEOUT_S": "5"}, check=False)
    finally:
        holder.kill()
    errors = _task_errors(tmp_path / "logs")
    assert any(e.startswith(f"error: rank 0 on node1 could not serve the rendezvous at node1:{port} (") and
               "set MASTER_PORT to a free one" in e for e in errors), errors
    assert any(e.startswith(f"error: rank 1 on node2 could not reach the rendezvous at node1:{port}") or
               e.startswith(f"error: rank 1 on node2: the rendezvous at node1:{port} failed") for e in errors), errors


def test_tasks_spread_unevenly_over_nodes_are_one_line(synthetic_root, tmp_path):
    jid = sbatch("slurm/train.sbatch", _train(synthetic_root, tmp_path / "run", "--max-iters", "2"),
                 ["--nodes=2", "--ntasks=3", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                  "--time=10", f"--output={tmp_path}/%j.out"])
    wait_job(jid, timeout=120)
    text = (tmp_path / f"{jid}.out").read_text()
    errors = sorted(set(line for line in text.splitlines() if line.startswith("error: ")))
    assert errors == ["error: this srun step runs 3 tasks on 2 nodes, unevenly (2,1 per node); give every node the "
                      "same number: request --nodes N --ntasks-per-node K (not --ntasks)."], text
    assert "Traceback" not in text and not (tmp_path / "run").exists()
