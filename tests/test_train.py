"""Training end to end under real process groups: equivalence, resume, evaluation, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cityseg.checkpoint import load
from cityseg.labels import CLASS_NAMES
from conftest import TINY, run_script
from wandb_log import read_run


def _train(root, out, nproc, *extra):
    return run_script("train.py", ["--data-root", str(root), "--out-dir", str(out), *TINY, *extra], nproc=nproc)


@pytest.mark.parametrize("steps", [1, 3])
def test_two_processes_of_two_train_like_one_process_of_four(synthetic_root, tmp_path, steps):
    # Synthetic labels hold ignored (void and padded) pixels in different amounts per image, so a per-rank
    # mean loss would give different gradients; the loss is normalised by the global valid-pixel count.
    # Tolerances: the first layers' gradients are sums of ~1e5 terms that nearly cancel, so float32 rounding
    # alone (1 against 2 threads in one process) moves step-1 gradients by about 2e-4 of their largest entry;
    # after 3 steps at this learning rate the gradients drift apart by ~10% that way, the weights by ~1e-5.
    args = ["--max-iters", str(steps), "--eval-every", "0", "--lr", "0.05", "--seed", "3", "--num-pictures", "0"]
    _train(synthetic_root, tmp_path / "one", 0, "--batch-size", "4", *args)
    _train(synthetic_root, tmp_path / "two", 2, "--batch-size", "2", *args)
    a, b = load(tmp_path / "one" / "last.pt"), load(tmp_path / "two" / "last.pt")
    assert a["iteration"] == b["iteration"] == steps
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, atol=5e-5, rtol=1e-3, msg=k)
        else:
            assert torch.equal(b["model"][k], v), k
    if steps == 1:  # the momentum buffer after one SGD step is the gradient itself
        grads = [(s["momentum_buffer"], t["momentum_buffer"])
                 for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())]
        assert all(ga.abs().max() > 0 for ga, _ in grads)
        for ga, gb in grads:
            assert (ga - gb).abs().max() <= 3e-3 * ga.abs().max()


def test_torchrun_train_stop_resume_evaluate(synthetic_root, tmp_path):
    out = tmp_path / "run"
    first = _train(synthetic_root, out, 2, "--max-iters", "4", "--ckpt-every", "2", "--eval-every", "2",
                   "--batch-size", "2", "--wandb", "offline")
    assert "Resumed" not in first.stdout
    state = load(out / "last.pt")
    assert state["iteration"] == 4 and (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    run_id = state["wandb_id"]
    assert run_id and list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    # "stop": the run ended at 4; the same command with a longer schedule resumes from last.pt
    second = _train(synthetic_root, out, 2, "--max-iters", "6", "--ckpt-every", "2", "--eval-every", "2",
                    "--batch-size", "2", "--wandb", "offline")
    assert f"Resumed from {out / 'last.pt'} at iteration 4" in second.stdout
    state = load(out / "last.pt")
    assert state["iteration"] == 6 and state["wandb_id"] == run_id
    steps = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line]
    assert train_steps == [1, 2, 3, 4, 5, 6] and max(steps) == 6
    # W&B (offline, read back from its transaction logs): one run id, the full config, steps continuing
    run = read_run(out / "wandb")
    assert set(run["ids"]) == {run_id} and len(run["ids"]) == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: v for k, v in run["config"].items() if k != "_wandb"} == saved and saved["max_iters"] == 6
    logged = [step for step, row in run["history"] if "train/loss" in row]
    assert logged == [1, 2, 3, 4, 5, 6]
    # each periodic evaluation draws pictures of the first val images, on disk and in W&B
    assert [p.name for p in sorted((out / "pictures").iterdir())] == [f"iter_0000000{i}" for i in (2, 4, 6)]
    assert len(list((out / "pictures" / "iter_00000002").glob("*_panel.png"))) == 4
    assert [step for step, row in run["history"] if "val/predictions/_type" in row] == [2, 4, 6]
    ev = run_script("evaluate.py", ["--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root),
                                    "--workers", "1", "--device", "cpu"], nproc=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["iou"]) == set(CLASS_NAMES)
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["num_images"] == 5 and metrics["iteration"] == 6
    assert "mIoU" in ev.stdout


def test_resume_refuses_a_different_width(synthetic_root, tmp_path):
    out = tmp_path / "run"
    _train(synthetic_root, out, 0, "--max-iters", "1", "--batch-size", "2")
    proc = run_script("train.py", ["--data-root", str(synthetic_root), "--out-dir", str(out), *TINY,
                                   "--max-iters", "2", "--batch-size", "2", "--width", "16"], check=False)
    assert proc.returncode == 2
    assert "--width 8 but this run asks for 16" in proc.stderr and "Traceback" not in proc.stderr
    assert load(out / "last.pt")["iteration"] == 1  # the checkpoint the user had is untouched


def test_checkpoint_holds_the_training_state(synthetic_root, tmp_path):
    out = tmp_path / "run"
    _train(synthetic_root, out, 0, "--max-iters", "2", "--batch-size", "2", "--amp", "off")
    state = load(out / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "iteration", "epoch", "best_miou", "config", "rng",
                "wandb_id"):
        assert key in state, key
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert state["config"]["width"] == 8 and state["scheduler"]["last_epoch"] == 2
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert not list(out.glob(".*.tmp"))  # no temp file left behind by the atomic write


@pytest.mark.parametrize("nproc", [1, 3])
def test_evaluation_does_not_depend_on_the_number_of_processes(synthetic_root, tmp_path, nproc):
    # 5 val images over 3 processes: shards of 2, 2 and 1, no padding duplicates.
    out = tmp_path / "run"
    _train(synthetic_root, out, 0, "--max-iters", "2", "--batch-size", "2")
    args = ["--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root), "--workers", "0",
            "--device", "cpu"]
    run_script("evaluate.py", [*args, "--out-dir", str(tmp_path / "single")])
    run_script("evaluate.py", [*args, "--out-dir", str(tmp_path / "multi")], nproc=nproc)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    multi = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert multi["num_pixels"] == single["num_pixels"] == _valid_pixels(synthetic_root)
    assert multi["iou"] == single["iou"] and multi["miou"] == single["miou"]


def _valid_pixels(root) -> int:
    import cv2
    import numpy as np
    total = 0
    for p in sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png")):
        total += int((cv2.imread(str(p), cv2.IMREAD_UNCHANGED) != 255).sum())
    assert total > 0 and total < 5 * 64 * 128
    return total


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_modes_train(synthetic_root, tmp_path, amp):
    out = tmp_path / amp
    _train(synthetic_root, out, 0, "--max-iters", "2", "--batch-size", "2", "--amp", amp, "--lr", "0.05")
    state = load(out / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # fp16 trains through a GradScaler whose state is checkpointed; bf16 needs none
    assert ("scale" in state["scaler"]) == (amp == "fp16")


@pytest.mark.gpu
def test_cuda_training_uses_syncbn_bf16_and_channels_last(synthetic_root, tmp_path):
    out = tmp_path / "gpu"
    args = ["--data-root", str(synthetic_root), "--out-dir", str(out), "--width", "8", "--crop-size", "64x128",
            "--device", "cuda", "--wandb", "off", "--workers", "1", "--max-iters", "3", "--batch-size", "2"]
    run_script("train.py", args, nproc=1)
    state = load(out / "last.pt")
    assert state["iteration"] == 3 and state["config"]["amp"] == "auto"
    run_script("evaluate.py", ["--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root),
                               "--device", "cuda", "--workers", "1"])
    assert (out / "metrics.json").is_file()


def test_gradient_accumulation_trains_like_the_same_micro_batches_on_more_processes(synthetic_root, tmp_path):
    # 2 processes x batch 1 x 2 micro-steps and 1 process x batch 2 x 2 micro-steps see the same micro-batches
    # (with synchronised BatchNorm over them) and the same normalisation: the same weights.
    args = ["--max-iters", "3", "--eval-every", "0", "--lr", "0.05", "--accum-steps", "2", "--num-pictures", "0"]
    _train(synthetic_root, tmp_path / "one", 0, "--batch-size", "2", *args)
    _train(synthetic_root, tmp_path / "two", 2, "--batch-size", "1", *args)
    a, b = load(tmp_path / "one" / "last.pt"), load(tmp_path / "two" / "last.pt")
    assert a["iteration"] == b["iteration"] == 3 and a["step_in_epoch"] == b["step_in_epoch"] == 2  # 6 of 4
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=5e-5, rtol=1e-4, msg=k)
    plain = tmp_path / "plain"  # and accumulation is not a no-op: one batch of 2 per step differs
    _train(synthetic_root, plain, 0, "--batch-size", "2", *args[:-4], "--num-pictures", "0")
    assert not torch.allclose(load(plain / "last.pt")["model"]["inc.0.weight"], a["model"]["inc.0.weight"])


def test_compiled_model_trains_like_eager(synthetic_root, tmp_path):
    # Compiled alone, and compiled under DDP (2 processes x batch 1, gradients through the shared-memory hook),
    # against eager 1 process x batch 2.
    args = ["--max-iters", "2", "--eval-every", "0", "--lr", "0.05", "--num-pictures", "0", "--batch-size"]
    _train(synthetic_root, tmp_path / "eager", 0, *args, "2")
    _train(synthetic_root, tmp_path / "compiled", 0, *args, "2", "--compile")
    _train(synthetic_root, tmp_path / "compiled_ddp", 2, *args, "1", "--compile")
    a = load(tmp_path / "eager" / "last.pt")
    for run in ("compiled", "compiled_ddp"):
        b = load(tmp_path / run / "last.pt")
        assert not any(k.startswith("_orig_mod.") for k in b["model"])
        for k, v in a["model"].items():
            torch.testing.assert_close(b["model"][k], v, atol=1e-4, rtol=1e-3, msg=f"{run}: {k}")
