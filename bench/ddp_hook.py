"""Within one launch: 2-process CPU DDP steps with gradients through shared memory against gloo's all-reduce.

    python bench/ddp_hook.py [--steps 16] [--launches 1]

The same process pair alternates its steps between cityseg's shared-memory hook and gloo's all-reduce hook
(PyTorch's default), so the drift of a virtual machine from one launch to the next, which is larger than
the difference, hits both alike. Same model and batch as the DDP part of ``bench/run.py`` (width 16, batch 2
of 256x512, one thread a process). ``--same`` alternates gloo with itself: the noise floor of the method.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import bench_config, fake_batch, one_core  # noqa: E402


def _worker(rank: int, port: int, root: str, steps: int, same: bool, out: str) -> None:
    one_core()
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import cityseg.engine
    from cityseg import distributed as du
    from cityseg import shm
    from cityseg.signals import StopFlag

    cityseg.engine.shared_memory_sum = lambda **_: None  # the trainer registers no hook; ours follows
    ctx = du.init("cpu")
    try:
        cfg = bench_config(Path(root), Path(root) / "out", 16, (256, 512), 2)
        trainer = cityseg.engine.Trainer(cfg, ctx, StopFlag(ctx.control_group))
        summer = shm.shared_memory_sum(slot_bytes=1 << 20)
        assert summer is not None, "no shared memory between the two processes"
        use_shm = [False]

        def hook(state, bucket):  # type: ignore[no-untyped-def]
            return shm.average_gradients_hook(summer, bucket) if use_shm[0] else allreduce_hook(None, bucket)

        trainer.ddp.register_comm_hook(None, hook)
        batch = fake_batch(cfg, rank)
        trainer.train_step(batch)
        times: dict[str, list[float]] = {"a": [], "b": []}
        for i in range(2 * steps):
            side = "ab"[i % 2]
            use_shm[0] = side == "a" and not same
            du.barrier()
            t0 = time.perf_counter()
            trainer.train_step(batch)
            times[side].append(time.perf_counter() - t0)
        Path(f"{out}.{rank}").write_text(json.dumps(times))
    finally:
        du.teardown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="Steps of each kind per launch.")
    p.add_argument("--launches", type=int, default=1, help="Process pairs launched one after another.")
    p.add_argument("--same", action="store_true", help="Alternate gloo with gloo (the method's noise).")
    args = p.parse_args()
    import torch.multiprocessing as mp

    from cityseg.synthetic import write_tree

    a_name = "gloo" if args.same else "shared memory"
    with tempfile.TemporaryDirectory(prefix="cityseg-bench-") as tmp:
        root = Path(tmp) / "data"
        write_tree(root, num_train=4, num_val=1, num_test=0, size=(256, 512), seed=0)
        for launch in range(args.launches):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = f"{tmp}/times"
            mp.spawn(_worker, args=(port, str(root), args.steps, args.same, out), nprocs=2, join=True)
            runs = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
            a, b = (max(statistics.median(run[k]) for run in runs) for k in "ab")
            print(f"launch {launch + 1}: median step {a_name} {a:.4f} s, gloo {b:.4f} s, "
                  f"ratio {a / b:.4f}", flush=True)


if __name__ == "__main__":
    main()
