"""Exact resume and fault tolerance: signals, SIGKILL under torchrun, corrupt checkpoints, W&B continuity."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from cityseg import checkpoint as ckpt
from cityseg.signals import StopFlag
from conftest import (MAX_ITERS, REPO, TINY, assert_same_training_state, run_metrics, run_script, script_command,
                      start_training, tiny_trainer, train_args, wait_for_iteration, worker_pid)
from wandb_log import read_run


def _exit_codes(torchrun_log: str) -> dict[int, int]:
    """Each failed worker's exit code by rank, from torchrun's failure summary."""
    codes, rank = {}, None
    for line in torchrun_log.splitlines():
        if line.strip().startswith("rank "):
            rank = int(line.split(":")[1].split()[0])
        elif line.strip().startswith("exitcode") and rank is not None:
            codes[rank] = int(line.split(":")[1].split()[0])
    return codes


SIGNAL_CASES = [  # processes, signal, who gets it, extra flags (SIGUSR2: test_slurm's requeue tests)
    (0, signal.SIGTERM, "main", []),
    # a terminal's Ctrl-C or SLURM signal every process of the job: DataLoader workers must keep serving
    (0, signal.SIGINT, "process group", ["--workers", "2"]),
    # with 2 processes only rank 1 is signalled: the ranks must still agree on one iteration
    (2, signal.SIGUSR1, "rank 1", []),
]


@pytest.mark.parametrize("nproc, sig, target, extra", SIGNAL_CASES,
                         ids=[f"{n or 1}proc-{s.name}-{t.replace(' ', '')}" for n, s, t, _ in SIGNAL_CASES])
def test_signal_at_a_random_iteration_then_resume_is_bitwise_exact(synthetic_root, tmp_path, reference, nproc,
                                                                   sig, target, extra):
    stop_at = random.Random(nproc + sig).randint(2, MAX_ITERS - 10)
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        proc = start_training(train_args(synthetic_root, out, "--wandb", "offline", *extra), nproc, log=log,
                              start_new_session=True)
        wait_for_iteration(out, stop_at, proc)
        if target == "process group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(worker_pid(proc.pid, 1) if nproc else proc.pid, sig)
        rc = proc.wait(timeout=120)
    first = (tmp_path / "first.log").read_text()
    assert f"Stopped by {signal.Signals(sig).name} at iteration" in first, first
    if nproc:  # every worker exits 128 + signal; torchrun reports failed workers with a status of its own, 1
        assert rc == 1 and _exit_codes(first) == {r: 128 + sig for r in range(nproc)}, first
    else:
        assert rc == 128 + sig and "Traceback" not in first, first
    k = ckpt.load(out / "last.pt")["iteration"]
    assert stop_at <= k < MAX_ITERS
    again = run_script("train.py", train_args(synthetic_root, out, "--wandb", "offline", *extra), nproc=nproc)
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in (out / "train.log").read_text()
    assert_same_training_state(reference(nproc), out)
    run = read_run(out / "wandb")  # one W&B run across the restart, steps continuing, none twice
    assert len(run["ids"]) == 2 and len(set(run["ids"])) == 1
    assert run["ids"][0] == ckpt.load(out / "last.pt")["wandb_id"]
    assert [s for s, row in run["history"] if "train/loss" in row] == list(range(3, MAX_ITERS + 1, 3))


def test_torchrun_restarts_a_sigkilled_worker_from_the_last_checkpoint(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = start_training(train_args(synthetic_root, out), 2, max_restarts=1, log=log)
        wait_for_iteration(out, 15, proc)  # past the checkpoint at 12, before the one at 18
        os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
        rc = proc.wait(timeout=300)
    text = (tmp_path / "torchrun.log").read_text()
    assert rc == 0, text
    assert "Resumed from" in text and "at iteration 12" in text
    assert_same_training_state(reference(2), out)


def test_corrupt_last_checkpoint_falls_back_to_the_newest_good_one(synthetic_root, tmp_path, reference):
    out = tmp_path / "run"
    run_script("train.py", train_args(synthetic_root, out))
    # --keep-ckpts 2 (the default): the two newest periodic checkpoints, last.pt linked to the newest
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_00000018.pt", "ckpt_00000024.pt"]
    assert os.path.samefile(out / "last.pt", out / "ckpt_00000024.pt")  # a link, not a second copy
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])  # truncated (ckpt_24 is the same file)
    (out / "notes.txt").write_text("mine")
    (out / ".ckpt_00000030.pt.x7.tmp").write_bytes(b"half a checkpoint")  # a write that was cut off
    kept = {p.name for p in out.iterdir()} - {".ckpt_00000030.pt.x7.tmp"}
    # resuming at 24, the run has nothing left to train: what resuming alone does to the directory
    proc = run_script("train.py", train_args(synthetic_root, out, "--max-iters", "18"))
    assert "last.pt: not a readable cityseg checkpoint" in proc.stdout
    assert f"Resumed from {out / 'ckpt_00000018.pt'} at iteration 18" in proc.stdout
    assert {p.name for p in out.iterdir()} == kept  # nothing deleted but the cut-off temp file
    assert (out / "last.pt").read_bytes() == data[: len(data) // 3]  # the unreadable file is left for you
    proc = run_script("train.py", train_args(synthetic_root, out))  # and training on gets where it was
    assert f"Resumed from {out / 'ckpt_00000018.pt'} at iteration 18" in proc.stdout
    assert_same_training_state(reference(0), out)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_script("train.py", train_args(synthetic_root, out), check=False)
    assert proc.returncode == 2 and "none of its 1 checkpoints can be read" in proc.stderr
    assert (out / "last.pt").read_bytes() == b"not a checkpoint"  # nothing the user had is touched


def _permutation(epoch: int, seed: int = 11, n: int = 8) -> list[int]:
    """The sample order of an epoch, as the README defines it: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _train_recording(argv: list[str], monkeypatch) -> list[int]:
    """Run train.py's job in this process; return the training-split indices it loaded, in order."""
    from cityseg.config import parse_config
    from cityseg.data import CityscapesDataset
    from cityseg.engine import train

    loads: list[int] = []
    original = CityscapesDataset.load

    def load(self, i):
        if self.split == "train":
            loads.append(i)
        return original(self, i)

    monkeypatch.setattr(CityscapesDataset, "load", load)
    train(parse_config(argv))
    monkeypatch.setattr(CityscapesDataset, "load", original)
    return loads


def test_resume_on_another_process_count(synthetic_root, tmp_path, monkeypatch):
    # Saved on 2 processes x 2 in the middle of an epoch (8 images: 2 steps an epoch; iteration 3 is the
    # second step of epoch 1), resumed on 1 process x 4: the same global batch, so the same samples in the
    # same order and, up to float summation order, the same weights as the run that was not interrupted.
    out = tmp_path / "run"
    args = train_args(synthetic_root, out, "--max-iters", "5", "--ckpt-every", "3", "--eval-every", "0")
    run_script("train.py", args, nproc=2)
    uninterrupted = ckpt.load(out / "ckpt_00000005.pt")
    for name in ("last.pt", "ckpt_00000005.pt"):
        (out / name).unlink()  # as if the 2-process job had been stopped after iteration 3
    state = ckpt.load(out / "ckpt_00000003.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    loaded = _train_recording([*args, "--batch-size", "4"], monkeypatch)
    # the first unseen global batch is the second of epoch 1; then the first of epoch 2
    assert loaded == _permutation(1)[4:] + _permutation(2)[:4]
    resumed = ckpt.load(out / "last.pt")
    assert resumed["iteration"] == 5 and resumed["world_size"] == 1
    assert ("2 processes before, 1 process now, global batch 4 as before; epoch 1 continues at step 1 of its order"
            in (out / "train.log").read_text())
    for k, v in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    # Another global batch (3): epoch 1 continues at the first global batch of 3 not yet fully seen. 4 samples
    # were seen, so global batch 1 (samples 3-5) comes next, revisiting sample 3; then epoch 2 in batches of 3.
    argv = [a if a != str(out) else str(changed) for a in args]
    loaded = _train_recording([*argv, "--batch-size", "3"], monkeypatch)
    assert loaded == _permutation(1)[3:6] + _permutation(2)[0:3]
    assert "continuing epoch 1 at sample 3 of its order" in (changed / "train.log").read_text()
    assert ckpt.load(changed / "last.pt")["iteration"] == 5


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
    # at this rate the weights break before the loss does: the check before each checkpoint catches them
    assert line.startswith("error: the weights became non-finite by iteration "), line
    bad = int(line.split("iteration ")[1].split(";")[0])
    written = sorted(out.glob("ckpt_*.pt"))
    assert written, "a checkpoint should have been written before the weights broke"
    for p in written:  # every checkpoint written is from before the bad iteration, and finite
        state = ckpt.load(p)
        assert state["iteration"] < bad
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert f"the last one is {out / 'last.pt'} ({written[-1].name})" in line


def test_late_resume_loads_no_skipped_batch(synthetic_root, tmp_path, monkeypatch):
    """Resuming at iteration 100,001 reads exactly the samples it trains on, in order, as at iteration 2."""
    def resume_at(it: int) -> list[int]:
        out = tmp_path / f"at{it}"
        base = ["--data-root", str(synthetic_root), "--out-dir", str(out), *TINY, "--batch-size", "2",
                "--eval-every", "0", "--max-val-images", "1", "--num-pictures", "0", "--seed", "11"]
        _train_recording([*base, "--max-iters", "2"], monkeypatch)
        state = ckpt.load(out / "last.pt")
        state.update(iteration=it, epoch=it // 4, step_in_epoch=it % 4)  # 8 images: 4 steps of 2 an epoch
        state["scheduler"]["last_epoch"] = it
        ckpt.save(state, out / "last.pt")
        return _train_recording([*base, "--max-iters", str(it + 3)], monkeypatch)

    # three steps of two images from the saved position on; nothing skipped or replayed
    assert resume_at(2) == _permutation(0)[4:8] + _permutation(1)[0:2]
    late = 100_001 // 4
    assert resume_at(100_001) == _permutation(late)[2:8]


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


def test_a_file_corrupted_mid_run_leaves_a_resumable_checkpoint_and_one_error_line(synthetic_root, tmp_path,
                                                                                     reference):
    # 2 processes: the rank that fails to decode the file tells the other through the stop flag, one step
    # ahead of the step that needs the file, and both stop together at a completed step with a checkpoint.
    root, out = tmp_path / "cityscapes", tmp_path / "run"
    shutil.copytree(synthetic_root, root)
    image = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[5]
    good = image.read_bytes()
    with open(tmp_path / "first.log", "w") as log:
        proc = start_training(train_args(root, out), 2, log=log)
        wait_for_iteration(out, 8, proc)
        image.write_bytes(good[: len(good) // 3])  # every image is read once per epoch of 2 steps
        proc.wait(timeout=120)
    text = (tmp_path / "first.log").read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text  # one line, from rank 0, whichever rank failed
    k = ckpt.load(out / "last.pt")["iteration"]
    assert 8 <= k < MAX_ITERS
    assert errors[0].startswith(f"error: {image}: not a readable image (truncated or corrupt)"), errors[0]
    assert f"saved {out / 'last.pt'} at iteration {k}; fix or remove that file" in errors[0]
    image.write_bytes(good)  # fixed: the same command resumes there and ends as if nothing had happened
    again = run_script("train.py", train_args(root, out), nproc=2)
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout
    assert_same_training_state(reference(2), out)


def test_the_weights_are_checked_before_every_checkpoint(synthetic_root, tmp_path):
    from cityseg.engine import NonFiniteLossError

    trainer = tiny_trainer(synthetic_root, tmp_path)
    trainer.save_periodic()
    assert ckpt.load(tmp_path / "last.pt")["iteration"] == 0
    with torch.no_grad():
        trainer.model.up[1].conv[0].weight[0, 0, 0, 0] = float("nan")
    trainer.iteration = 1
    for save in (trainer.save_periodic, trainer.save_best):
        with pytest.raises(NonFiniteLossError, match="the weights became non-finite by iteration 1"):
            save()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_00000000.pt", "last.pt"]
    trainer.log.close()


def test_the_wandb_api_key_is_never_written_anywhere(synthetic_root, tmp_path):
    key = "cityseg0test0key0" + "7" * 23  # the form of a W&B key, which must not end up on disk or in logs
    out = tmp_path / "run"
    cmd, env = script_command("train.py", train_args(synthetic_root, out, "--max-iters", "3", "--wandb", "offline"))
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "WANDB_API_KEY": key}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert key not in proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (out / "config.yaml").is_file()  # W&B ran, offline
    for p in files:  # checkpoints, logs, config, the wandb/ folder
        assert key.encode() not in p.read_bytes(), p


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="runs train.py as an unprivileged user (root ignores permissions): needs root")
def test_no_permission_while_saving_is_one_line_through_train_py(synthetic_root):
    base = Path(tempfile.mkdtemp(prefix="cityseg-perm-"))
    try:
        base.chmod(0o755)
        root, out, home = base / "cityscapes", base / "run", base / "home"
        shutil.copytree(synthetic_root, root)
        for p in [root, *root.rglob("*")]:  # readable by the unprivileged user
            p.chmod(0o755 if p.is_dir() else 0o644)
        for d in (out, home):
            d.mkdir()
            d.chmod(0o777)
        cmd, env = script_command("train.py", train_args(root, out, "--ckpt-every", "2", "--eval-every", "0"))
        with open(base / "log", "w") as log:
            proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd], cwd=REPO,
                                    env={**env, "HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=log, text=True)
            wait_for_iteration(out, 3, proc)  # past the checkpoint at 2
            out.chmod(0o555)  # the directory becomes read-only for the run
            rc = proc.wait(timeout=120)
        err = (base / "log").read_text()
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {out}/ckpt_0000000") and "(Permission denied)" in err, err
        assert "The previous checkpoint there is intact." in err
        assert ckpt.load(out / "last.pt")["iteration"] == 2
    finally:
        (base / "run").chmod(0o755)
        shutil.rmtree(base)


# -- what a resumed run may change (cityseg.resume) ------------------------------------------------------------
QUIET = dict(eval_every=0, num_pictures=0, max_val_images=1)


def _trained(root, out, **settings):
    """A tiny in-process run to ``max_iters`` (one process), returning its last checkpoint."""
    trainer = tiny_trainer(root, out, **{**QUIET, **settings})
    trainer.resume()
    trainer.fit()
    return ckpt.load(out / "last.pt")


@pytest.mark.quick
def test_optimizer_settings_changed_on_resume_take_effect_and_each_parameter_keeps_its_state(synthetic_root,
                                                                                             tmp_path):
    out = tmp_path / "run"
    saved = _trained(synthetic_root, out, max_iters=4)  # SGD 0.01, momentum 0.9, wd 5e-4 on every parameter
    names = [n for n, _ in tiny_trainer(synthetic_root, tmp_path / "x").model.named_parameters()]
    saved_buffer = {n: saved["optimizer"]["state"][i]["momentum_buffer"] for i, n in enumerate(names)}
    trainer = tiny_trainer(synthetic_root, out, **QUIET, max_iters=8, lr=0.5, momentum=0.5, weight_decay=0.1,
                           decay_norm_bias=False)
    trainer.resume()
    lr_now = 0.5 * (1 - 4 / 8) ** 0.9  # the new --lr at the poly factor of iteration 4 of 8 (no warmup)
    for group in trainer.optimizer.param_groups:
        one_d = all(p.ndim <= 1 for p in group["params"])
        assert group["lr"] == pytest.approx(lr_now, rel=1e-12) and group["momentum"] == 0.5
        assert group["weight_decay"] == (0.0 if one_d else 0.1)  # --no-decay-norm-bias: two groups now
    assert len(trainer.optimizer.param_groups) == 2
    for name, p in trainer.model.named_parameters():  # carried over per parameter into the new groups
        assert torch.equal(trainer.optimizer.state[p]["momentum_buffer"], saved_buffer[name]), name
    trainer.fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/lr"] for r in logged if r["iteration"] == 8 and "train/lr" in r] == [0.0]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["lr"], config["momentum"], config["weight_decay"]) == (0.5, 0.5, 0.1)


def test_the_encoder_learning_rate_multiplier_takes_effect_on_resume(synthetic_root, tmp_path):
    out = tmp_path / "run"
    model = dict(model="unet_resnet18", encoder_weights="none", decoder_channels="16,16,8,8,8")
    _trained(synthetic_root, out, max_iters=2, encoder_lr_mult=0.1, **model)
    trainer = tiny_trainer(synthetic_root, out, **QUIET, **model, max_iters=4, encoder_lr_mult=0.5)
    trainer.resume()
    encoder = {id(p) for p in trainer.model.encoder.parameters()}
    factor = (1 - 2 / 4) ** 0.9
    for group in trainer.optimizer.param_groups:
        in_encoder = id(group["params"][0]) in encoder
        assert group["lr"] == pytest.approx(0.01 * (0.5 if in_encoder else 1.0) * factor, rel=1e-12)


@pytest.fixture(scope="module")
def ema_run(synthetic_root, tmp_path_factory):
    """A 2-iteration run with a moving average, whose directory the refusal tests resume (and never change)."""
    out = tmp_path_factory.mktemp("ema_run")
    _trained(synthetic_root, out, max_iters=2, ema_decay=0.9)
    return out


@pytest.mark.parametrize("change, said", [
    ({"optimizer": "adamw"}, "--optimizer: this run was started with --optimizer sgd"),
    ({"seed": 5}, "--seed: this run was started with --seed 0"),
    ({"init_from": "/tmp/other.pt"}, "--init-from: this run was started with --init-from ''"),
    ({"width": 16}, "--width: this run was started with --width 8"),
    ({"model": "unet_resnet18", "encoder_weights": "none"}, "--model: this run was started with --model unet"),
    ({"aux_weight": 0.4}, "--aux-weight: this run was started with --aux-weight 0.0"),
    ({"ema_decay": 0.0}, "pass --ema-decay 0.9 (or another non-zero decay) to keep it"),
])
def test_settings_that_cannot_change_on_resume_are_refused_naming_the_value_the_run_started_with(
        synthetic_root, ema_run, change, said):
    before = {p.name: p.stat().st_mtime_ns for p in ema_run.iterdir()}
    trainer = tiny_trainer(synthetic_root, ema_run, **QUIET, **{"max_iters": 4, "ema_decay": 0.9, **change})
    with pytest.raises(ckpt.CheckpointError) as e:
        trainer.resume()
    assert said in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(ema_run / "last.pt") in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in ema_run.iterdir() if p.name in before} == before


@pytest.mark.quick
def test_sigterm_during_an_evaluation_saves_first_stops_promptly_and_the_next_run_evaluates_again(
        synthetic_root, tmp_path, monkeypatch):
    from cityseg.evaluation import Predictor

    settings = dict(max_iters=6, eval_every=4, ckpt_every=4, num_pictures=0)
    predicted = []
    predict = Predictor.__call__

    def slow_val_set(self, images):
        predicted.append(1)
        if len(predicted) == 2:  # a real SIGTERM in the middle of the evaluation of iteration 4
            os.kill(os.getpid(), signal.SIGTERM)
        return predict(self, images)

    monkeypatch.setattr(Predictor, "__call__", slow_val_set)
    out = tmp_path / "run"

    def run(directory):
        trainer = tiny_trainer(synthetic_root, directory, **settings)
        trainer.stop.install()
        try:
            trainer.resume()
            return trainer.fit()
        finally:
            trainer.stop.restore()

    assert run(out)["stopped_by"] == signal.SIGTERM
    assert len(predicted) == 2  # stopped at the next image, not after all 5
    assert ckpt.load(out / "last.pt")["iteration"] == 4  # written before the evaluation began
    assert "val/miou" not in (out / "metrics.jsonl").read_text()
    assert "evaluation stopped by SIGTERM" in (out / "train.log").read_text()
    assert run(out)["stopped_by"] == 0  # the same command: evaluates iteration 4 again, then trains on
    evaluated = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if "val/miou" in line]
    assert evaluated == [4, 6]
    run(tmp_path / "uninterrupted")
    a, b = ckpt.load(out / "last.pt"), ckpt.load(tmp_path / "uninterrupted" / "last.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert run_metrics(out) == run_metrics(tmp_path / "uninterrupted")
