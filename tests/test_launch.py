"""slurm/submit.py without a cluster: the generated sbatch script and argument checking."""

from __future__ import annotations

import subprocess
import sys

from cityseg.launch import executor_parameters, build_parser, split_argv
from conftest import REPO


def submit(cluster_args, entry_args):
    return subprocess.run([sys.executable, "slurm/submit.py", *cluster_args, "--", *entry_args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_generated_script_for_two_nodes_of_four_gpus(tmp_path):
    proc = submit(["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--timeout-min", "90",
                   "--folder", str(tmp_path / "%j"), "--dry-run"], ["--data-root", "x"])
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --time=90", "#SBATCH --partition=gpu"):
        assert line in script.splitlines(), line
    assert "srun" in script and "submitit.core._submit" in script
    assert proc.returncode == 0, proc.stderr


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
