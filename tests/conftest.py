"""Shared fixtures: tiny synthetic Cityscapes trees, subprocess launchers and process-group hygiene."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cityseg import checkpoint as ckpt
from cityseg.synthetic import write_tree

REPO = Path(__file__).resolve().parent.parent
# One thread, as every train.py and evaluate.py the tests start (OMP_NUM_THREADS=1): runs in this process and in
# subprocesses then compute alike, bit for bit.
torch.set_num_threads(1)
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


_last_port: int | None = None


def free_port() -> int:
    """A port nothing holds now, for a rendezvous a test starts next. Not one the kernel picks (port 0): those come
    from its ephemeral range, where every outgoing connection also takes its local port, so with two pytest
    workers another test's connection could take it before the rendezvous binds it. Instead one of 10000-19999
    (below the ephemeral range and the SLURM templates' 20000 + job id), in a block of this worker's own, in turn."""
    global _last_port
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = 10000 // max(count, 1)
    first = 10000 + worker * size
    port = _last_port if _last_port is not None else first + os.getpid() % size
    for _ in range(size):
        port = first + (port + 1 - first) % size
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken, or still in TIME_WAIT
                continue
        _last_port = port
        return port
    raise RuntimeError(f"no free port in {first}-{first + size - 1}")


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


def entry_point(name: str):
    """train.py or evaluate.py as a module, to call its ``main(argv)`` in this process (``name``: train or
    evaluate)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cityseg_entry_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_status(e: SystemExit) -> int:
    """The status a process ending with ``e`` exits with (``sys.exit()``: 0, ``sys.exit("text")``: 1)."""
    return e.code if isinstance(e.code, int) else int(e.code is not None)


def call_main(name: str, argv: list[str]) -> int:
    """An entry point's ``main(argv)`` in this process; its exit status."""
    try:
        entry_point(name).main(list(map(str, argv)))
    except SystemExit as e:
        return exit_status(e)
    return 0


def run_main(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run an entry point's ``main(argv)`` in this process: (exit status, stderr)."""
    return call_main(name, argv), capsys.readouterr().err


def run_script(script: str, args: list[str], nproc: int = 0, timeout: float = 300, check: bool = True,
               isolated: bool = False) -> subprocess.CompletedProcess:
    """Run train.py/evaluate.py to completion and return its status and output. As ``python script`` (or torchrun
    with ``nproc`` processes) when ``isolated`` (the launcher or the process itself is what the test is about)
    or when W&B logs; otherwise through the script's own ``main``: in this process, or in ``nproc`` processes
    forked from it that meet in a real gloo process group through MASTER_ADDR/MASTER_PORT, as srun's tasks do
    (no interpreter start-up and imports for each run; the same code, one thread as in the subprocesses)."""
    wandb = "--wandb" in args and args[args.index("--wandb") + 1] != "off"
    if isolated or wandb:
        cmd, env = script_command(script, args, nproc)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    elif nproc:
        proc = _run_forked(script, args, nproc, timeout)
    else:
        proc = _run_in_process(script, args)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_forked(script: str, args: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """``main(args)`` of the script in ``nproc`` forked processes, ranks of one job; their outputs concatenated in
    rank order, the status the first non-zero one."""
    import multiprocessing
    import tempfile

    port, logs = free_port(), Path(tempfile.mkdtemp(prefix="cityseg-ranks-"))
    ranks = [multiprocessing.get_context("fork").Process(target=_forked_rank,
                                                         args=(script, list(map(str, args)), r, nproc, port, logs))
             for r in range(nproc)]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + timeout
    for p in ranks:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in ranks:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in ranks]
    out = "".join((logs / f"{r}.out").read_text(errors="replace") for r in range(nproc))
    err = "".join((logs / f"{r}.err").read_text(errors="replace") for r in range(nproc))
    shutil.rmtree(logs, ignore_errors=True)
    status = next((c for c in codes if c), 0)
    return subprocess.CompletedProcess([script, *args, f"(forked, {nproc} ranks)"], status, out, err)


def _forked_rank(script: str, args: list[str], rank: int, world: int, port: int, logs: Path) -> None:
    """One rank: the launch variables a launcher sets, its output into files (native writes too), ``main``."""
    for name in [k for k in os.environ if k.startswith(("TORCHELASTIC_", "SLURM_"))]:
        del os.environ[name]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out, err = open(logs / f"{rank}.out", "w"), open(logs / f"{rank}.err", "w")
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    os.chdir(REPO)
    try:
        status = call_main(script.removesuffix(".py"), args)
    except BaseException:  # a traceback, as a launcher's worker would print it
        import traceback

        traceback.print_exc()
        status = 1
    out.flush()
    err.flush()
    os._exit(status)


def run_submit(argv: list[str]) -> subprocess.CompletedProcess:
    """``python slurm/submit.py argv`` as that script's two lines in this process, its output captured."""
    import contextlib
    import io

    from cityseg.errors import report_user_errors
    from cityseg.launch import submit

    out, err, status = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), report_user_errors():
            status = submit(list(argv))
    except SystemExit as e:
        status = exit_status(e)
    return subprocess.CompletedProcess(["slurm/submit.py", *argv], status, out.getvalue(), err.getvalue())


def spawn(fn, args: tuple, nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn`` of ``fn(rank, *args)``, the processes forked from this one (no interpreter
    start-up and imports for each)."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="fork")


def _run_in_process(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python script args`` as its ``main(args)`` in this process, its output captured, its signal handlers and
    the working directory put back afterwards."""
    import contextlib
    import io
    import signal

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = call_main(script.removesuffix(".py"), args)
    finally:
        os.chdir(cwd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess([script, *args], status, out.getvalue(), err.getvalue())


MAX_ITERS = 24
# log every 3 so that most stops land inside a logging window; eval and checkpoints on their own periods
ARGS = ["--max-iters", str(MAX_ITERS), "--batch-size", "2", "--lr", "0.05", "--log-every", "3",
        "--eval-every", "8", "--ckpt-every", "6", "--seed", "11"]


def train_args(root, out, *extra) -> list[str]:
    """train.py arguments of the shared 24-iteration tiny run."""
    return ["--data-root", str(root), "--out-dir", str(out), *TINY, *ARGS, *extra]


@pytest.fixture(scope="session")
def reference(synthetic_root, tmp_path_factory):
    """Uninterrupted runs with 1 and 2 processes (computed on first use)."""
    cache = {}

    def get(nproc: int) -> Path:
        if nproc not in cache:
            out = tmp_path_factory.mktemp(f"ref{nproc}")
            run_script("train.py", train_args(synthetic_root, out), nproc=nproc)
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
    assert run_metrics(a) == run_metrics(b)


def run_metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in rows]  # timing differs


def wait_for_iteration(out: Path, it: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path, end = out / "metrics.jsonl", time.time() + timeout
    while time.time() < end:
        lines = path.read_text().splitlines() if path.is_file() else []
        done = [json.loads(line)["iteration"] for line in lines if line.endswith("}")]  # complete records
        if done and max(done) >= it:
            return
        assert proc.poll() is None, f"run ended before iteration {it}"
        time.sleep(0.01)
    raise AssertionError(f"no iteration {it} within {timeout}s")


def worker_pid(agent: int, rank: int) -> int:
    """PID of the torchrun worker with RANK=rank (a child of the agent)."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {agent}")


def start_training(args, nproc, max_restarts=0, log=None, **popen) -> subprocess.Popen:
    """Start train.py (plain python, or torchrun with ``nproc`` processes) without waiting for it."""
    cmd, env = script_command("train.py", args, nproc, max_restarts)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, **popen)


# -- the quick tier: every module of cityseg/ must run some of its code -----------------------------------------
PACKAGE = REPO / "cityseg"
_reached: set[str] = set()


def _tracer(frame, event, arg):
    """Records the files of the functions called: not a module's or a class's own body (import), and no line
    tracing (little overhead)."""
    code = frame.f_code
    if code.co_flags & inspect.CO_NEWLOCALS and code.co_filename.startswith(str(PACKAGE)):
        _reached.add(code.co_filename)
    return None


def pytest_configure(config):
    if os.environ.get("CITYSEG_QUICK"):  # scripts/test.sh --quick
        import threading

        sys.settrace(_tracer)
        threading.settrace(_tracer)


def pytest_sessionfinish(session, exitstatus):
    """Under --quick, a module of cityseg/ none of whose functions ran in the test process fails the tier."""
    if not os.environ.get("CITYSEG_QUICK") or exitstatus != 0:
        return
    sys.settrace(None)
    modules = {str(p) for p in PACKAGE.rglob("*.py") if _defines_functions(p)}
    missed = sorted(str(Path(p).relative_to(REPO)) for p in modules - _reached)
    if missed:
        print(f"\nquick tier: no function of {', '.join(missed)} ran; add a quick test that goes through it",
              file=sys.stderr)
        session.exitstatus = 1


def _defines_functions(path: Path) -> bool:
    import ast

    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(ast.parse(path.read_text())))


# -- two pytest workers (scripts/test.sh: pytest -n 2 --dist loadfile) ---------------------------------------------
# These files drive one SLURM cluster, switching it between one node and two: they run on one worker, in order.
ONE_CLUSTER = ("tests/test_slurm.py", "tests/test_multinode_slurm.py")


@pytest.hookimpl(optionalhook=True)  # without pytest-xdist (pytest -p no:xdist) there is no such hook
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadfile``: a file's tests stay on one worker (module fixtures are built once), the files of
    ONE_CLUSTER share one, and the files with the most tests go first. (xdist's own ``loadgroup`` marks reach no
    scheduler under pytest 9.2, which no longer takes the node ids they rewrite.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneClusterScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "slurm cluster" if path in ONE_CLUSTER else path

    return OneClusterScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- an independent evaluation, to check evaluate.py's numbers against -------------------------------------------
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")


def reference_scores(checkpoint: Path, root: Path, split: str = "val") -> dict:
    """Per-class IoU and accuracy, mIoU and pixel accuracy of a checkpoint, computed without cityseg's
    evaluation, metrics, data or labels code: OpenCV reads the files, cityscapesscripts' table maps the ids,
    the U-Net predicts each whole image, numpy counts. IoU by the official rules (a class with neither ground
    truth nor prediction is left out of the mean)."""
    import cv2
    import numpy as np
    from cityscapesscripts.helpers.labels import labels

    from cityseg.models import model_from_config

    lut = np.full(256, 255, np.int64)
    for lab in labels:
        if 0 <= lab.id < 256 and 0 <= lab.trainId < 19:
            lut[lab.id] = lab.trainId
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = model_from_config(state["config"])  # the model the checkpoint names, from cityseg's registry
    weights = state["ema"]["weights"] if state.get("ema") else state["model"]  # evaluate.py's default: the average
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("aux_head.")})
    model = model.to(memory_format=torch.channels_last).eval()  # as evaluate.py runs it, for the same bits
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    mat = np.zeros((19, 19), np.int64)
    for path in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        gt_path = str(path).replace("leftImg8bit", "gtFine").replace("_gtFine.png", "_gtFine_labelIds.png")
        gt = lut[cv2.imread(gt_path, cv2.IMREAD_UNCHANGED)]
        x = ((torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std)
        with torch.no_grad():
            pred = model(x.contiguous(memory_format=torch.channels_last)).argmax(1)[0].numpy()
        keep = gt != 255
        np.add.at(mat, (gt[keep], pred[keep]), 1)
    tp, gt_count, pred_count = np.diag(mat), mat.sum(1), mat.sum(0)
    union = gt_count + pred_count - tp
    iou = {n: (float(tp[i] / union[i]) if union[i] else None) for i, n in enumerate(CLASS_NAMES)}
    acc = {n: (float(tp[i] / gt_count[i]) if gt_count[i] else None) for i, n in enumerate(CLASS_NAMES)}
    present = [v for v in iou.values() if v is not None]
    return {"iou": iou, "acc": acc, "miou": sum(present) / len(present), "pixel_acc": tp.sum() / mat.sum(),
            "num_pixels": int(mat.sum())}


def assert_matches_reference(metrics: dict, expected: dict) -> None:
    """evaluate.py's metrics.json against :func:`reference_scores`, to float rounding."""
    assert metrics["num_pixels"] == expected["num_pixels"]
    for name in CLASS_NAMES:
        a, b = metrics["iou"][name], expected["iou"][name]
        assert (a is None and b is None) or abs(a - b) < 1e-9, (name, a, b)
    assert abs(metrics["miou"] - expected["miou"]) < 1e-9 and abs(metrics["pixel_acc"] - expected["pixel_acc"]) < 1e-9


@pytest.fixture(scope="session")
def trained(synthetic_root, tmp_path_factory) -> Path:
    """A checkpoint of a small U-Net trained in this process long enough to predict several classes, with an
    auxiliary head (which evaluation leaves out) and a moving average of its weights (which evaluation uses)."""
    out = tmp_path_factory.mktemp("trained")
    trainer = tiny_trainer(synthetic_root, out, max_iters=30, batch_size=4, optimizer="adamw", lr=0.01,
                           eval_every=0, num_pictures=0, max_val_images=1, aux_weight=0.4, ema_decay=0.5)
    trainer.fit()
    state = torch.load(out / "last.pt", weights_only=True)
    assert "aux_head.weight" in state["model"] and state["ema"]
    return out / "last.pt"


def tiny_trainer(root: Path, out: Path, ctx=None, **overrides):
    """cityseg's Trainer in this process, tiny-model settings unless overridden (``ctx``: a DistContext from
    ``cityseg.distributed.init``; one CPU process by default)."""
    from cityseg import distributed as du
    from cityseg.config import TrainConfig
    from cityseg.engine import Trainer
    from cityseg.signals import StopFlag

    settings = dict(data_root=str(root), out_dir=str(out), width=8, crop_size="64x128", device="cpu", wandb="off",
                    workers=0, batch_size=2, max_iters=10, warmup_iters=0)
    cfg = TrainConfig(**{**settings, **overrides})
    return Trainer(cfg, ctx or du.init(cfg.device), StopFlag())
