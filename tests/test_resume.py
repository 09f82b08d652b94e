"""Exact resume and fault tolerance: signals, SIGKILL under torchrun, corrupt checkpoints, W&B continuity."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cityseg import checkpoint as ckpt
from cityseg.signals import StopFlag
from conftest import REPO, TINY, run_script, script_command
from wandb_log import read_run

MAX_ITERS = 24
# log every 3 so that most stops land inside a logging window; eval and checkpoints on their own periods
ARGS = ["--max-iters", str(MAX_ITERS), "--batch-size", "2", "--lr", "0.05", "--log-every", "3",
        "--eval-every", "8", "--ckpt-every", "6", "--seed", "11"]


def _args(root, out, *extra):
    return ["--data-root", str(root), "--out-dir", str(out), *TINY, *ARGS, *extra]


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    """Uninterrupted runs with 1 and 2 processes (computed on first use)."""
    cache = {}

    def get(nproc: int) -> Path:
        if nproc not in cache:
            out = tmp_path_factory.mktemp(f"ref{nproc}")
            run_script("train.py", _args(synthetic_root, out), nproc=nproc)
            cache[nproc] = out
        return cache[nproc]
    return get


def assert_same_training_state(a: Path, b: Path) -> None:
    """Bitwise equality of model, optimizer, schedule and scaler, and of the logged metrics."""
    sa, sb = ckpt.load(a / "last.pt"), ckpt.load(b / "last.pt")
    assert sa["iteration"] == sb["iteration"] == MAX_ITERS
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert sa["scheduler"] == sb["scheduler"] and sa["best_miou"] == sb["best_miou"]
    assert _metrics(a) == _metrics(b)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in rows]  # timing differs


def _wait_for_iteration(out: Path, it: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path, end = out / "metrics.jsonl", time.time() + timeout
    while time.time() < end:
        if path.is_file():
            done = [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()]
            if done and max(done) >= it:
                return
        assert proc.poll() is None, f"run ended before iteration {it}"
        time.sleep(0.01)
    raise AssertionError(f"no iteration {it} within {timeout}s")


def _worker_pid(agent: int, rank: int) -> int:
    """PID of the torchrun worker with RANK=rank (a child of the agent)."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {agent}")


def _start(args, nproc, max_restarts=0, log=None):
    cmd, env = script_command("train.py", args, nproc, max_restarts)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("nproc, sig", [(0, signal.SIGTERM), (2, signal.SIGTERM), (0, signal.SIGUSR2)],
                         ids=["1proc-SIGTERM", "2proc-SIGTERM", "1proc-SIGUSR2"])
def test_signal_at_a_random_iteration_then_resume_is_bitwise_exact(synthetic_root, tmp_path, reference, nproc,
                                                                   sig):
    stop_at = random.Random(nproc + sig).randint(2, MAX_ITERS - 10)
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(_args(synthetic_root, out, "--wandb", "offline"), nproc, log=log)
        _wait_for_iteration(out, stop_at, proc)
        # With 2 processes only rank 1 is signalled: the ranks must still agree on one iteration.
        os.kill(_worker_pid(proc.pid, 1) if nproc else proc.pid, sig)
        rc = proc.wait(timeout=120)
    first = (tmp_path / "first.log").read_text()
    assert f"Stopped by {signal.Signals(sig).name} at iteration" in first, first
    assert rc == (128 + sig if not nproc else 1)  # torchrun reports its failed workers with status 1
    k = ckpt.load(out / "last.pt")["iteration"]
    assert stop_at <= k < MAX_ITERS
    again = run_script("train.py", _args(synthetic_root, out, "--wandb", "offline"), nproc=nproc)
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in (out / "train.log").read_text()
    if not nproc:
        assert_same_training_state(reference(0), out)
        run = read_run(out / "wandb")  # one W&B run across the restart, steps continuing, none twice
        assert len(run["ids"]) == 2 and len(set(run["ids"])) == 1
        assert run["ids"][0] == ckpt.load(out / "last.pt")["wandb_id"]
        steps = [s for s, row in run["history"] if "train/loss" in row]
        assert steps == list(range(3, MAX_ITERS + 1, 3))
    else:
        assert_same_training_state(reference(2), out)


def test_torchrun_restarts_a_sigkilled_worker_from_the_last_checkpoint(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = _start(_args(synthetic_root, out), 2, max_restarts=1, log=log)
        _wait_for_iteration(out, 15, proc)  # past the checkpoint at 12, before the one at 18
        os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
        rc = proc.wait(timeout=300)
    text = (tmp_path / "torchrun.log").read_text()
    assert rc == 0, text
    assert "Resumed from" in text and "at iteration 12" in text
    assert_same_training_state(reference(2), out)


def test_corrupt_last_checkpoint_falls_back_to_the_newest_good_one(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    run_script("train.py", _args(synthetic_root, out))
    # --keep-ckpts 2 (the default): the two newest periodic checkpoints, last.pt linked to the newest
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_00000018.pt", "ckpt_00000024.pt"]
    assert os.path.samefile(out / "last.pt", out / "ckpt_00000024.pt")  # a link, not a second copy
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])  # truncated (ckpt_24 is the same file)
    proc = run_script("train.py", _args(synthetic_root, out))
    assert "last.pt: not a readable cityseg checkpoint" in proc.stdout
    assert f"Resumed from {out / 'ckpt_00000018.pt'} at iteration 18" in proc.stdout
    assert_same_training_state(reference(0), out)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_script("train.py", _args(synthetic_root, out), check=False)
    assert proc.returncode == 2 and "none of its 1 checkpoints can be read" in proc.stderr
    assert (out / "last.pt").read_bytes() == b"not a checkpoint"  # nothing the user had is touched


def test_resume_on_another_process_count(synthetic_root, tmp_path):
    # Saved on 2 processes x 2, resumed on 1 process x 4: the same global batch, so the same samples in the
    # same order and, up to float summation order, the same weights as the run that was not interrupted.
    out = tmp_path / "run"
    args = _args(synthetic_root, out, "--max-iters", "9", "--ckpt-every", "3", "--keep-ckpts", "4")
    run_script("train.py", args, nproc=2)
    uninterrupted = ckpt.load(out / "ckpt_00000009.pt")
    for name in ("last.pt", "ckpt_00000009.pt"):
        (out / name).unlink()  # as if the 2-process job had been stopped after iteration 6
    proc = run_script("train.py", [*args, "--batch-size", "4"])
    assert f"Resumed from {out / 'ckpt_00000006.pt'} at iteration 6" in proc.stdout
    resumed = ckpt.load(out / "last.pt")
    assert resumed["iteration"] == 9 and resumed["world_size"] == 1
    for k, v in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    # with another global batch the run continues too, from the first global batch not yet fully seen
    proc = run_script("train.py", [*args, "--max-iters", "11", "--batch-size", "2"])
    assert "global batch changed from 4 (1 processes) to 2" in proc.stdout
    assert ckpt.load(out / "last.pt")["iteration"] == 11


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save({"model": {"w": torch.ones(3)}, "iteration": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    assert "previous checkpoint there is intact" in str(e.value)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_non_finite_loss_stops_with_the_iteration_and_no_bad_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", ["--data-root", str(synthetic_root), "--out-dir", str(out), *TINY,
                                   "--max-iters", "20", "--batch-size", "2", "--ckpt-every", "1",
                                   "--lr", "1e12", "--optimizer", "sgd"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the "), line
    assert "became non-finite" in line and "stopped without writing a checkpoint" in line, line
    bad = int(line.split("iteration ")[1].split(";")[0])
    for p in out.glob("ckpt_*.pt"):  # every checkpoint written is from before the bad iteration, and finite
        state = ckpt.load(p)
        assert state["iteration"] < bad
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_late_resume_loads_no_skipped_batch(synthetic_root, tmp_path, monkeypatch):
    """Resuming at iteration 100,000 reads exactly the batches it trains on, as at iteration 2."""
    from cityseg.config import parse_config
    from cityseg.data import CityscapesDataset
    from cityseg.engine import train

    loads = []
    original = CityscapesDataset.load
    monkeypatch.setattr(CityscapesDataset, "load", lambda self, i: loads.append(i) or original(self, i))

    def resume_at(it: int) -> int:
        out = tmp_path / f"at{it}"
        base = ["--data-root", str(synthetic_root), "--out-dir", str(out), *TINY, "--batch-size", "2",
                "--eval-every", "0", "--max-val-images", "1", "--num-pictures", "0"]
        train(parse_config([*base, "--max-iters", "2"]))
        state = ckpt.load(out / "last.pt")
        spe = 8 // 2
        state.update(iteration=it, epoch=it // spe, step_in_epoch=it % spe)
        state["scheduler"]["last_epoch"] = it
        ckpt.save(state, out / "last.pt")
        loads.clear()
        train(parse_config([*base, "--max-iters", str(it + 3)]))
        return len(loads)

    early, late = resume_at(2), resume_at(100_001)
    assert early == late == 3 * 2 + 1  # three steps of two images, one val image; nothing skipped or replayed


def test_a_second_signal_exits_at_once_but_a_forwarded_duplicate_does_not(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    flag = StopFlag()
    flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGINT, None)  # torchrun forwarding the same Ctrl-C, milliseconds later
    assert flag.poll() == signal.SIGINT and exits == []
    flag.first_at -= 5  # a person pressing Ctrl-C again later
    flag._handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]
