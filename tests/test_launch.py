"""slurm/submit.py without a cluster: the generated sbatch script and argument checking; and the GPU check's
tools without a GPU: scripts/gpu_check.sh's tiers and summary, bench/gpu.py's command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityseg import launch
from cityseg.errors import UserError
from cityseg.launch import executor_parameters, build_parser, split_argv
from conftest import REPO, run_submit


def submit(cluster_args, entry_args, real_process=False):
    """slurm/submit.py as a user runs it (``real_process``), or its main in this process."""
    if not real_process:
        return run_submit([*cluster_args, "--", *entry_args])
    return subprocess.run([sys.executable, "slurm/submit.py", *cluster_args, "--", *entry_args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_generated_script_for_two_nodes_of_four_gpus(tmp_path):
    proc = submit(["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--timeout-min", "90",
                   "--folder", str(tmp_path / "%j"), "--dry-run"], ["--data-root", "x"], real_process=True)
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --time=90", "#SBATCH --partition=gpu"):
        assert line in script.splitlines(), line
    assert "srun" in script and "submitit.core._submit" in script
    assert proc.returncode == 0, proc.stderr


@pytest.mark.quick
def test_one_task_per_gpu_by_default():
    args = build_parser().parse_args(split_argv(["--gpus-per-node", "8", "--", "--lr", "1"])[0])
    assert executor_parameters(args)["tasks_per_node"] == 8
    args = build_parser().parse_args(["--tasks-per-node", "2"])
    assert executor_parameters(args)["tasks_per_node"] == 2 and "gpus_per_node" not in executor_parameters(args)


def test_bad_training_flags_fail_before_submitting(tmp_path):
    proc = submit(["--dry-run", "--folder", str(tmp_path)], ["--data-root", "x", "--crop-size", "big"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --crop-size")


def test_gpu_check_fails_without_torch_and_passes_without_a_gpu(tmp_path):
    missing = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python"),
                                  "OUT_DIR": str(tmp_path / "out")})
    assert missing.returncode == 1 and "cannot import torch" in missing.stdout, missing.stdout + missing.stderr
    import torch

    if torch.cuda.is_available():
        return
    cpu = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out")})
    assert cpu.returncode == 0 and "sees no CUDA GPU; nothing to check" in cpu.stdout, cpu.stdout + cpu.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_under_a_regular_file_is_one_line_before_anything_is_submitted(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for mode in ("--dry-run", "--local"):
        proc = submit([mode, "--folder", str(afile / "logs" / "%j")], ["--data-root", "x"])
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
        assert proc.stderr == (f"error: --folder {afile}/logs/%j: {afile} is a file, not a directory, so the job's "
                               f"logs cannot go there; pass a folder under a directory (default slurm_logs/%j).\n")


@pytest.mark.parametrize("cluster_args, refused", [
    (["--timeout-min", "1"], "--signal-delay-s 120 leaves no time to train within --timeout-min 1: USR2 must come "
                             "at most half the time limit before its end; pass --timeout-min 4 or more, or "
                             "--signal-delay-s 30 or less."),
    (["--timeout-min", "3"], "--signal-delay-s 120 leaves no time to train within --timeout-min 3: USR2 must come "
                             "at most half the time limit before its end; pass --timeout-min 4 or more, or "
                             "--signal-delay-s 90 or less."),
    (["--timeout-min", "4"], None),  # USR2 two minutes in, two minutes before the end
    (["--timeout-min", "1", "--signal-delay-s", "30"], None),
], ids=["1-min", "3-min", "4-min", "1-min-30-s"])
@pytest.mark.quick
def test_a_signal_delay_not_well_inside_the_time_limit_is_refused(tmp_path, capsys, cluster_args, refused):
    argv = [*cluster_args, "--folder", str(tmp_path / "%j"), "--dry-run", "--", "--data-root", "x"]
    if refused is None:
        assert launch.submit(argv) == 0
        assert f"#SBATCH --time={cluster_args[1]}" in capsys.readouterr().out.splitlines()
        return
    with pytest.raises(UserError) as e:
        launch.submit(argv)
    assert str(e.value) == refused and capsys.readouterr().out == ""


# -- scripts/gpu_check.sh and bench/gpu.py without a GPU -------------------------------------------------------------
GPU_TESTS = "tests/test_gpu.py::"
#: The order of the phases: what most likely finds a defect first.
PHASE_ORDER = ["install", "syncbn", "bf16", "host_sync", "compile", "torchrun", "evaluation", "bench"]


def gpu_check_plan(tier: str | None) -> list[tuple[str, int, int, str, list[str]]]:
    """scripts/gpu_check.sh --list: (phase, estimated s, limit s, kind, arguments) for each phase of a tier (None:
    the default)."""
    flags = [f"--{tier}"] if tier else []
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--list", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True, env={**os.environ, "PYTHON": sys.executable}).stdout
    return [(name, int(estimate), int(limit), kind, args)
            for name, estimate, limit, kind, *args in map(str.split, out.splitlines())]


def bench_gpu():
    """bench/gpu.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_test_ids() -> list[str]:
    """The node ids of tests/test_gpu.py as pytest collects them (without CUDA they are collected, then skipped)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    ids = [line for line in proc.stdout.splitlines() if line.startswith(GPU_TESTS)]
    assert proc.returncode == 0 and len(ids) >= 17, proc.stdout + proc.stderr
    return ids


def selected(args: list[str], ids: list[str]) -> set[str]:
    """The collected ids that pytest arguments select: an id itself, or a test function with all its parameters."""
    return {i for i in ids if any(i == a or i.startswith(a + "[") for a in args)}


def test_the_gpu_check_tiers_run_every_gpu_test_most_likely_defects_first(gpu_test_ids):
    plans = {tier: gpu_check_plan(tier) for tier in ("quick", "full", "all")}
    assert gpu_check_plan(None) == plans["full"]
    for tier, plan in plans.items():
        names = [phase[0] for phase in plan]
        assert names == [n for n in PHASE_ORDER if n in names] and len(set(names)) == len(names), (tier, names)
        for name, _, _, kind, args in plan:
            if kind == "pytest":  # every argument selects a test: a renamed test is no phase that runs nothing
                assert all(selected([a], gpu_test_ids) for a in args), (tier, name, args)
    runs = {tier: selected([a for *_, kind, args in plan if kind == "pytest" for a in args], gpu_test_ids)
            for tier, plan in plans.items()}
    assert runs["all"] == set(gpu_test_ids)
    assert runs["full"] == set(gpu_test_ids) - {GPU_TESTS + "test_torchrun_sigterm_and_resume_on_cuda[default]"}
    assert runs["quick"] < runs["full"] and {GPU_TESTS + n for n in (
        "test_cuda_sync_batchnorm_equals_batchnorm_on_the_concatenated_batch",
        "test_a_bf16_step_has_the_loss_and_gradient_of_an_fp32_step",
        "test_torchrun_sigterm_and_resume_on_cuda[deterministic]")} <= runs["quick"]
    # the estimates (one H100/H200, install included) fit the lease: quick within 3 minutes, full within 6
    assert sum(p[1] for p in plans["quick"]) <= 180 and sum(p[1] for p in plans["full"]) <= 360
    assert all(estimate < limit for plan in plans.values() for _, estimate, limit, _, _ in plan)


def test_the_gpu_check_bench_phases_name_the_bench_rows():
    gpu = bench_gpu()
    rows = {}
    for tier in ("quick", "full", "all"):
        (args,) = [args for *_, kind, args in gpu_check_plan(tier) if kind == "bench"]
        rows[tier] = gpu.parse_args(args).row_names
    # the NCHW row: the layout change's defect; the synchronised BatchNorm's: its only bf16 step on one GPU
    assert rows["quick"] == rows["full"] == ["eager_nchw", "eager_channels_last", "eager_syncbn"]
    assert rows["all"] == list(gpu.STEP_ROWS)


def test_the_gpu_bench_checks_its_command_line_without_a_gpu():
    gpu = bench_gpu()
    shown = subprocess.run([sys.executable, "bench/gpu.py", "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and all(name in shown.stdout.replace("\n", " ") for name in gpu.STEP_ROWS)
    bad = subprocess.run([sys.executable, "bench/gpu.py", "--rows", "eager_nchw,bogus"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1] == (
        "gpu.py: error: --rows: unknown row bogus; the rows are eager_nchw, eager_channels_last, eager_syncbn, "
        "compiled_channels_last")
    assert gpu.select_rows(None, False, {"step"}) == ["eager_nchw", "eager_channels_last", "eager_syncbn"]
    # the loop and the curve are compared with the channels_last row, so it is measured with them
    assert gpu.select_rows("eager_syncbn,eager_nchw", True, {"step", "loop"}) == [
        "eager_nchw", "eager_channels_last", "eager_syncbn"]
    assert gpu.parse_args(["--only", "eval"]).row_names == []
    # the step alone builds a Trainer on a tree of one batch: no 56 full-resolution images to write
    assert gpu.tree_size({"step"}, gpu.parse_args([])) == (4, 1)
    assert gpu.tree_size({"step", "loop", "eval"}, gpu.parse_args([])) == (32, 24)


def test_the_gpu_check_summary_is_written_after_each_phase_and_a_limit_ends_a_phase_and_its_children(tmp_path):
    child = tmp_path / "child.pid"
    script = f"""
source scripts/gpu_check.sh
OUT_DIR={tmp_path} PYTHON={sys.executable} LOG={tmp_path}/checks.log
: > "$LOG"
init_summary first hang last
run_phase first 60 {sys.executable} -c "print('FAILED tests/x.py::t - boom'); \\
  print('= 1 failed, 2 passed in 0.1s ='); raise SystemExit(1)"
cp {tmp_path}/summary.json {tmp_path}/after_first.json
run_phase hang 1 bash -c 'sleep 60 & echo $! > {child}; wait'
"""
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124, proc.stdout + proc.stderr  # the last phase's status: timeout's
    after_first = json.loads((tmp_path / "after_first.json").read_text())
    assert [(p["phase"], p["status"], p["detail"]) for p in after_first["phases"]] == [
        ("first", "failed (exit 1)", "FAILED tests/x.py::t - boom; 1 failed, 2 passed in 0.1s"),
        ("hang", "pending", ""), ("last", "pending", "")]
    final = json.loads((tmp_path / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in final["phases"]] == [
        ("first", "failed (exit 1)"), ("hang", "timed out (limit 1 s)"), ("last", "pending")]
    assert final["passed"] is False and final["phases"][1]["seconds"] in (1, 2)
    assert "hang " in (tmp_path / "summary.txt").read_text().splitlines()[1]
    assert "== first (limit 60 s)" in (tmp_path / "checks.log").read_text()
    pid, deadline = int(child.read_text()), time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:  # the phase's background child went with it
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.quick
def test_what_a_partition_cannot_give_is_said_in_words():
    """What slurm/submit.py says of a job that can never start, from the partition's limits (the SLURM tests
    reach it through a real pending job)."""
    from cityseg.pending import Partition, _gpus, _minutes, what_exceeds

    part = Partition("gpu", nodes=4, max_nodes=2, cpus_per_node=64, gpus_per_node=_gpus("gpu:a100:8(S:0-1)"),
                     max_time_min=_minutes("2-00:00:00"))
    assert (part.gpus_per_node, part.max_time_min) == (8, 2880)
    job = dict(nodes=2, tasks_per_node=8, cpus_per_task=8, gpus_per_node=8, timeout_min=60)
    assert what_exceeds({**job, "nodes": 3}, part) == "it asks for 3 nodes but partition gpu gives at most 2; lower --nodes"
    assert what_exceeds({**job, "cpus_per_task": 10}, part) == (
        "it asks for 8 tasks x 10 CPUs = 80 CPUs on each node but the nodes of partition gpu have 64; lower "
        "--tasks-per-node or --cpus-per-task")
    assert what_exceeds({**job, "timeout_min": 3000}, part).startswith("it asks for 3000 minutes but partition gpu "
                                                                       "allows 2880")
