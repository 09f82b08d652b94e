"""Process-group setup: the GPU each process takes, the precision --amp auto picks, and the setups that cannot
work (a taken port, an unreachable rendezvous, uneven SLURM tasks, a loopback host name, a small /dev/shm), each
one line instead of a hang."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from cityseg import distributed as du
from cityseg.data import check_shared_memory
from cityseg.errors import DataError
from cityseg.precision import amp_dtype, has_bf16_units
from conftest import REPO, TINY, entry_point, free_port


def test_each_process_takes_its_own_gpu_or_the_only_one_it_sees():
    assert [du.gpu_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun --nproc_per_node=4
    assert [du.gpu_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # srun --gpus-per-task=1: one GPU per task
    assert [du.gpu_index(r, 4) for r in range(4, 8)] == [0, 1, 2, 3]  # local ranks past the GPUs wrap


def test_amp_auto_is_bf16_only_where_the_gpu_has_bf16_units():
    assert [has_bf16_units(c) for c in [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0)]] == [False, False, True, True, True]
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("fp16", torch.device("cpu")) is torch.float16


def _entry(rank: int, port: int, root, out) -> subprocess.Popen:
    """train.py as rank ``rank`` of 2 at 127.0.0.1:port, launched the way submitit launches it (env only), with
    a rendezvous timeout of 2 s."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "CITYSEG_RDZV_TIMEOUT_S": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", "--data-root", str(root), "--out-dir", str(out), *TINY],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_taken_master_port_and_an_unreachable_rendezvous_are_one_line_each(synthetic_root, tmp_path):
    host = socket.gethostname()
    with socket.socket() as other:  # another program holds the port, and hangs up on what it does not speak
        other.bind(("127.0.0.1", 0))
        other.listen()
        port, nobody_port = other.getsockname()[1], free_port()

        def hang_up():
            while True:
                try:
                    conn, _ = other.accept()
                except OSError:
                    return
                conn.close()
        threading.Thread(target=hang_up, daemon=True).start()
        t0 = time.monotonic()
        procs = [_entry(0, port, synthetic_root, tmp_path / "run"), _entry(1, port, synthetic_root, tmp_path / "run"),
                 _entry(1, nobody_port, synthetic_root, tmp_path / "run")]  # the last: nothing listens at all
        errors = [p.communicate(timeout=120)[1] for p in procs]
        waited = time.monotonic() - t0
    assert [p.returncode for p in procs] == [2, 2, 2] and all(e.count("\n") == 1 for e in errors), errors
    assert errors[0].startswith(f"error: rank 0 on {host} could not serve the rendezvous at 127.0.0.1:{port} (")
    assert "set MASTER_PORT to a free one" in errors[0]
    # reaching a program that hangs up is found while connecting, or at the store's first use (torch 2.4)
    assert (errors[1].startswith(f"error: rank 1 on {host} could not reach the rendezvous at 127.0.0.1:{port} "
                                 f"within 2 s (") or errors[1].startswith(
        f"error: rank 1 on {host}: the rendezvous at 127.0.0.1:{port} failed before all 2 ranks met (")), errors[1]
    assert errors[2].startswith(f"error: rank 1 on {host} could not reach the rendezvous at 127.0.0.1:{nobody_port} "
                                f"within 2 s ("), errors[2]
    assert waited < 60
    assert not (tmp_path / "run").exists()  # nothing was written


def test_uneven_slurm_tasks_per_node_are_refused():
    du._check_slurm_tasks({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})
    with pytest.raises(du.LaunchError, match=r"runs 3 tasks on 2 nodes, unevenly \(2,1 per node\).*"
                                             r"--ntasks-per-node"):
        du._check_slurm_tasks({"SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1"})
    with pytest.raises(du.LaunchError, match="unevenly"):
        du._check_slurm_tasks({"SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x2),3"})


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


@pytest.mark.parametrize("env, said", [
    ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is not set (so 1 process): a rank must be from 0 to 0"),
    ({"RANK": "-1"}, "RANK=-1 but WORLD_SIZE is not set (so 1 process)"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 but WORLD_SIZE=2: a rank must be from 0 to 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be at least 1"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': must be an integer"),
    ({"LOCAL_RANK": "abc"}, "LOCAL_RANK='abc': must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 does not fit RANK=0"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"},
     "LOCAL_WORLD_SIZE=1 does not fit LOCAL_RANK=1 and WORLD_SIZE=4"),
])
@pytest.mark.quick
def test_inconsistent_launch_variables_are_one_line_naming_them(monkeypatch, env, said):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(du.LaunchError) as e:
        du._launch_env()
    assert str(e.value).startswith(said) and not e.value.collective, str(e.value)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert du._launch_env() == (1, 0, 2)  # torchrun's second process of two on a second node: fine


@pytest.mark.quick
def test_a_leftover_rank_in_the_shell_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Each process that sees bad variables says so, even the errors every rank would meet alike (a bad flag
    is printed by rank 0 only, and a leftover RANK=1 must not silence it)."""
    entry = entry_point("train")
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "run"
    for extra, said in ((["--max-iters", "2"], "error: RANK=1 but WORLD_SIZE is not set"),
                        (["--lr", "-1"], "error: --lr: got -1")):
        with pytest.raises(SystemExit) as e:
            entry.main(["--data-root", str(tmp_path), "--out-dir", str(out), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(said) and err.count("\n") == 1, err
    assert not out.exists()


def test_a_host_whose_name_resolves_to_loopback_is_refused_when_ranks_span_hosts(monkeypatch):
    # Rank 0's check against a real store in which the other ranks published what they found for their own
    # names; rank 0 itself names its interface (this machine's own name may well resolve to loopback).
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", free_port(), 3, is_master=True, timeout=datetime.timedelta(seconds=10),
                          wait_for_workers=False)
    store.set("cityseg/host/1", "node2 10.213.0.12")
    store.set("cityseg/host/2", "node3 127.0.1.1")
    with pytest.raises(du.LaunchError, match=r"run on 3 hosts but node3 \(127\.0\.1\.1\) resolves its own name to a loopback "
                                             r"address.*GLOO_SOCKET_IFNAME"):
        du._check_addresses(store, 0, 3)
    for rank, host in ((1, "x"), (2, "y")):  # all on one host: loopback is fine
        store.set(f"cityseg/host/{rank}", f"{socket.gethostname()} 127.0.0.1")
    du._check_addresses(store, 0, 3)


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "shm"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_a_small_dev_shm_is_refused_with_what_to_do(small_tmpfs):
    crop = 4 * 512 * 1024 * 4  # 4 crops of 512x1024, image and label bytes
    check_shared_memory([(2, crop)], 1, path=str(small_tmpfs))  # 2 workers x 4 batches x 8 MiB = 64 MiB: fits
    with pytest.raises(DataError) as e:
        check_shared_memory([(8, crop)], 1, path=str(small_tmpfs))
    assert str(e.value) == (f"{small_tmpfs}: 64 MiB, but the DataLoader workers of the 1 process(es) on this node "
                            f"keep about 256 MiB of batches there, and die with 'Bus error' when it runs out; give "
                            f"the container more (docker --shm-size=2g, or --ipc=host), or lower --workers (at "
                            f"most 2 would fit).")
