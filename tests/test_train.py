"""Training end to end under real process groups: equivalence, resume, evaluation, precision, compile."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from cityseg.checkpoint import load
from cityseg.config import parse_config
from conftest import (CLASS_NAMES, TINY, assert_matches_reference, free_port, reference_scores, run_script, spawn,
                      tiny_trainer)
from wandb_log import read_run

# The pieces of the reference recipe that change what a step computes (OHEM with a floor that bites at 64x128).
MM_PIECES = ["--loss", "ohem", "--ohem-min-kept", "1000", "--aux-weight", "0.4", "--cat-max-ratio", "0.75",
             "--photometric", "full", "--deterministic"]  # strict deterministic mode: no op of the recipe refuses


def _train(root, out, nproc, *extra):
    return run_script("train.py", ["--data-root", str(root), "--out-dir", str(out), *TINY, *extra], nproc=nproc)


def _train_here(root, out, *extra) -> dict:
    """train.py's job in this process (no process group), for tests that look inside it."""
    from cityseg.engine import train

    return train(parse_config(["--data-root", str(root), "--out-dir", str(out), *TINY, *extra]))


@pytest.mark.parametrize("steps, recipe", [(1, []), (3, []), (3, MM_PIECES)], ids=["1-step", "3-steps", "mm-recipe"])
def test_two_processes_of_two_train_like_one_process_of_four(synthetic_root, tmp_path, steps, recipe):
    # Synthetic labels hold ignored (void and padded) pixels in different amounts per image, so a per-rank
    # mean loss would give different gradients; the loss is normalised by the global valid-pixel count, and
    # OHEM picks its hard pixels over the global batch.
    # Tolerances: the first layers' gradients are sums of ~1e5 terms that nearly cancel, so float32 rounding
    # alone (1 against 2 threads in one process) moves step-1 gradients by about 2e-4 of their largest entry;
    # after 3 steps at this learning rate the gradients drift apart by ~10% that way, the weights by ~1e-5.
    args = ["--max-iters", str(steps), "--eval-every", "0", "--lr", "0.05", "--seed", "3", "--num-pictures", "0",
            *recipe]
    _train(synthetic_root, tmp_path / "one", 0, "--batch-size", "4", *args)
    _train(synthetic_root, tmp_path / "two", 2, "--batch-size", "2", *args)
    a, b = load(tmp_path / "one" / "last.pt"), load(tmp_path / "two" / "last.pt")
    assert a["iteration"] == b["iteration"] == steps
    assert a["model"].keys() == b["model"].keys()
    assert ("aux_head.weight" in a["model"]) == bool(recipe)
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


def _lr(it: int, max_iters: int, lr: float = 0.01, power: float = 0.9) -> float:
    """The poly schedule, written out (no warmup in these runs)."""
    return lr * (1 - it / max_iters) ** power


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
    changes = [line for line in second.stdout.splitlines() if line.startswith("config changed")]
    assert changes == ["config changed since the checkpoint: max_iters=6"]  # listed, and only what changed
    state = load(out / "last.pt")
    assert state["iteration"] == 6 and state["wandb_id"] == run_id
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert [r["iteration"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    # the poly schedule follows the new --max-iters from the resume on
    for r in train_records:
        expected = _lr(r["iteration"], 4 if r["iteration"] <= 4 else 6)
        assert r["train/lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), r
    assert [r["iteration"] for r in records if "val/miou" in r] == [2, 4, 6]
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
    expected = reference_scores(out / "last.pt", synthetic_root)
    assert_matches_reference(metrics, expected)
    assert metrics["num_images"] == 5 and metrics["iteration"] == 6
    # the printed table: per-class IoU and accuracy, then mIoU, pixel and mean class accuracy, categories
    lines = ev.stdout.splitlines()
    for name in CLASS_NAMES:
        iou, acc = expected["iou"][name], expected["acc"][name]
        row = f"{name:<16}{'n/a' if iou is None else f'{100 * iou:.2f}':>8}{'n/a' if acc is None else f'{100 * acc:.2f}':>8}"
        assert row in lines, row
    assert f"{'mIoU':<16}{100 * expected['miou']:>8.2f}" in lines
    assert f"{'pixel acc':<16}{100 * expected['pixel_acc']:>8.2f}" in lines
    accs = [v for v in expected["acc"].values() if v is not None]
    assert f"{'mean class acc':<16}{100 * sum(accs) / len(accs):>8.2f}" in lines
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in
            ("flat", "construction", "object", "nature", "sky", "human", "vehicle")][-7:] == \
        ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    assert any(line.startswith("category mIoU") for line in lines)


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


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_reaches_the_model(synthetic_root, tmp_path, amp, dtype):
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.training:
            seen.add(output.dtype)

    args = ["--max-iters", "2", "--batch-size", "2", "--lr", "0.05", "--eval-every", "0", "--num-pictures", "0"]
    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        _train_here(synthetic_root, tmp_path / amp, *args, "--amp", amp)
    finally:
        handle.remove()
    assert seen == {dtype}  # every training convolution ran in the autocast dtype
    _train_here(synthetic_root, tmp_path / "off", *args, "--amp", "off")
    mixed, full = load(tmp_path / amp / "last.pt"), load(tmp_path / "off" / "last.pt")
    assert not torch.equal(mixed["model"]["inc.0.weight"], full["model"]["inc.0.weight"])
    torch.testing.assert_close(mixed["model"]["inc.0.weight"], full["model"]["inc.0.weight"], atol=0.05, rtol=0)
    assert ("scale" in mixed["scaler"]) == (amp == "fp16")  # fp16 trains through a GradScaler; bf16 needs none


def test_fp16_skips_a_step_with_an_inf_gradient(synthetic_root, tmp_path):
    trainer = tiny_trainer(synthetic_root, tmp_path, amp="fp16")
    batch = [(torch.randint(0, 256, (2, 64, 128, 3), dtype=torch.uint8), torch.randint(0, 19, (2, 64, 128),
                                                                                       dtype=torch.uint8))]
    trainer.train_step(batch)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    scale = trainer.scaler.get_scale()
    weight = trainer.model.inc[0].weight
    handle = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    trainer.train_step(batch)  # the injected inf: the scaler skips the optimizer step and halves its scale
    handle.remove()
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "running" not in k and "num_batches" not in k)
    assert trainer.scaler.get_scale() == scale / 2
    trainer.train_step(batch)  # and the next, finite step updates the weights again
    assert not torch.equal(trainer.model.inc[0].weight, before["inc.0.weight"])


def test_fp16_first_step_skipped_for_an_inf_leaves_sgd_momentum_clean(synthetic_root, tmp_path):
    # Fused SGD creates its momentum buffers on its first step, inside the kernel the GradScaler's inf skips.
    # A skipped first step must leave the next one as the first real step: momentum = that step's gradient.
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randint(0, 256, (2, 64, 128, 3), generator=g, dtype=torch.uint8),
              torch.randint(0, 19, (2, 64, 128), generator=g, dtype=torch.uint8))]
    skipped = tiny_trainer(synthetic_root, tmp_path / "skipped", amp="fp16")
    handle = skipped.model.inc[0].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    skipped.train_step(batch)
    handle.remove()
    assert skipped.scaler.get_scale() == 2.0 ** 15  # the inf step was skipped
    skipped.train_step(batch)
    fresh = tiny_trainer(synthetic_root, tmp_path / "fresh", amp="fp16")
    fresh.train_step(batch)
    assert fresh.scaler.get_scale() == 2.0 ** 16  # a real first step
    for (name, a), b in zip(skipped.model.named_parameters(), fresh.model.parameters()):
        buf_a, buf_b = skipped.optimizer.state[a]["momentum_buffer"], fresh.optimizer.state[b]["momentum_buffer"]
        assert torch.isfinite(buf_a).all(), name
        torch.testing.assert_close(buf_a, buf_b, atol=1e-3 * float(buf_b.abs().max()) + 1e-6, rtol=0, msg=name)
    for log in (skipped.log, fresh.log):
        log.close()


def test_resuming_in_fp16_from_a_full_precision_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = ["--batch-size", "2", "--lr", "0.05", "--eval-every", "0", "--num-pictures", "0"]
    _train_here(synthetic_root, out, *args, "--max-iters", "2", "--amp", "off")
    _train_here(synthetic_root, out, *args, "--max-iters", "4", "--amp", "fp16")
    log = (out / "train.log").read_text()
    assert "the checkpoint was trained with --amp off, without a GradScaler; fp16 training continues with a " \
           "fresh one (scale 65536)" in log
    state = load(out / "last.pt")
    assert state["iteration"] == 4 and "scale" in state["scaler"]


def _count_allreduce_worker(rank: int, port: int, root: str, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from cityseg import distributed as du

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = du.init("cpu")
    try:
        counts = {}
        for accum in (1, 2, 3):
            trainer = tiny_trainer(root, f"{out}/{accum}", ctx, batch_size=1, accum_steps=accum)
            calls = []
            trainer.ddp.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(None, bucket))
            g = torch.Generator().manual_seed(rank)
            micro = [(torch.randint(0, 256, (1, 64, 128, 3), generator=g, dtype=torch.uint8),
                      torch.randint(0, 19, (1, 64, 128), generator=g, dtype=torch.uint8)) for _ in range(accum)]
            trainer.train_step(micro)  # DDP settles its buckets in the first step
            calls.clear()
            trainer.train_step(micro)
            counts[accum] = len(calls)
            trainer.log.close()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(counts, f)
    finally:
        dist.destroy_process_group()


def test_gradient_accumulation_all_reduces_once_per_step(synthetic_root, tmp_path):
    # Only the last micro-step all-reduces the gradient buckets (DDP's no_sync on the others): a step of 2 or 3
    # micro-batches makes exactly the all-reduce calls of a step of 1. The weights alone cannot tell.
    spawn(_count_allreduce_worker, (free_port(), str(synthetic_root), str(tmp_path)))
    for rank in range(2):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert counts["1"] >= 1 and counts["2"] == counts["1"] and counts["3"] == counts["1"], counts


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
    # Compiled under DDP (2 processes x batch 1, gradients through gloo, synchronised BatchNorm inside the graph)
    # against eager 1 process x batch 2, and against eager 2 x 1, which sums in the same order; and compilation
    # really happened: the log counts the graphs dynamo compiled. Under torchrun: inductor's compile workers are not
    # to be forked from this process.
    from cityseg.models import model_from_config

    args = ["--max-iters", "2", "--eval-every", "0", "--lr", "0.05", "--num-pictures", "0", "--batch-size"]
    _train(synthetic_root, tmp_path / "eager", 0, *args, "2")
    _train(synthetic_root, tmp_path / "eager_ddp", 2, *args, "1")
    run_script("train.py", ["--data-root", str(synthetic_root), "--out-dir", str(tmp_path / "compiled"), *TINY, *args,
                            "1", "--compile"], nproc=2, isolated=True)
    a, same_order = load(tmp_path / "eager" / "last.pt"), load(tmp_path / "eager_ddp" / "last.pt")
    assert "torch.compile" not in (tmp_path / "eager" / "train.log").read_text()
    log = (tmp_path / "compiled" / "train.log").read_text()
    stats = [line.split("torch.compile: ")[1] for line in log.splitlines() if "torch.compile: " in line]
    assert len(stats) == 1 and int(stats[0].split()[0]) > 0, log  # graphs were compiled
    assert " 0 of them after the first step" in stats[0], stats  # and none recompiled after it
    b = load(tmp_path / "compiled" / "last.pt")
    assert not any(k.startswith("_orig_mod.") for k in b["model"])
    torch.manual_seed(a["config"]["seed"])
    init = model_from_config(a["config"]).state_dict()  # the weights every run started from
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-4, rtol=1e-3, msg=k)
        if v.is_floating_point():  # within 0.1% of what training moved them, against the same summation order
            ref = same_order["model"][k]  # (inductor's own arithmetic for the statistics took deep layers 10% off)
            assert (b["model"][k] - ref).abs().max() <= 1e-3 * (ref - init[k]).abs().max(), k


def test_an_op_without_a_deterministic_kernel_is_one_line():
    # PyTorch's refusal under --deterministic (its wording for CUDA's bilinear upsampling backward), as the
    # trainer turns it into a user-facing line; other RuntimeErrors pass through untouched.
    from cityseg.engine import NondeterministicOpError, _explain_nondeterminism

    refusal = ("upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation...")
    with pytest.raises(NondeterministicOpError) as e:
        with _explain_nondeterminism():
            raise RuntimeError(refusal)
    assert str(e.value) == ("--deterministic: upsample_bilinear2d_backward_out_cuda has no deterministic CUDA kernel, "
                            "so this run could not repeat bit for bit; drop --deterministic, or the option that "
                            "uses it.")
    with pytest.raises(RuntimeError, match="out of memory"):
        with _explain_nondeterminism():
            raise RuntimeError("CUDA out of memory")
