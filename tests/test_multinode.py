"""Multi-node without SLURM: two torchrun agents (--nnodes=2, c10d rendezvous on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys

import torch

from cityseg.checkpoint import load
from conftest import REPO, TINY, free_port, run_script, script_command


def test_two_torchrun_nodes_train_like_one_node_with_two_processes(synthetic_root, tmp_path):
    args = [*TINY, "--data-root", str(synthetic_root), "--max-iters", "4", "--batch-size", "2", "--lr", "0.05",
            "--eval-every", "0", "--num-pictures", "0"]
    run_script("train.py", [*args, "--out-dir", str(tmp_path / "one")], nproc=2)
    port = free_port()
    _, env = script_command("train.py", [], 1)
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node-rank={n}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cityseg-test",
         "train.py", *args, "--out-dir", str(tmp_path / "two")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in range(2)]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    assert "on 2 x cpu" in "".join(outputs)
    a, b = load(tmp_path / "one" / "last.pt"), load(tmp_path / "two" / "last.pt")
    assert a["iteration"] == b["iteration"] == 4 and b["world_size"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
