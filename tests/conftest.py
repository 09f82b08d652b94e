"""Shared fixtures: tiny synthetic Cityscapes trees, subprocess launchers and process-group hygiene."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from cityseg.synthetic import write_tree

REPO = Path(__file__).resolve().parent.parent
# Never talk to the W&B servers from tests, whatever the developer's login.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
# Tiny-model settings shared by the tests that train: width 8, 64x128 crops, no W&B, CPU.
TINY = ["--width", "8", "--crop-size", "64x128", "--device", "cpu", "--wandb", "off", "--workers", "0",
        "--warmup-iters", "0", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic tree: 8 train, 5 val, 2 test images of 64x128."""
    return write_tree(tmp_path_factory.mktemp("cityscapes"), num_train=8, num_val=5, num_test=2,
                      size=(64, 128), seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_command(script: str, args: list[str], nproc: int = 0, max_restarts: int = 0) -> tuple[list, dict]:
    """Command and environment for train.py/evaluate.py: plain python (nproc=0) or torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return cmd, env


def run_script(script: str, args: list[str], nproc: int = 0, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py/evaluate.py to completion and return its output."""
    cmd, env = script_command(script, args, nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
