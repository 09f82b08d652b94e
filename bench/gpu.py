"""GPU benchmark: crops/s and model FLOP utilisation of the training step, and the loader rate it needs.

    python bench/gpu.py [--batch 4] [--crop 512x1024] [--width 64] [--steps 30] [--json FILE]

Runs on one CUDA GPU with the reference recipe's per-GPU batch (4 crops of 512x1024) for bf16 autocast,
bf16 + channels_last, and bf16 + channels_last + torch.compile, using cityseg's own training step
(Trainer.train_step). FLOPs per crop (forward and backward) come from torch's FLOP counter; utilisation is
against the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s, H200 the same; pass --peak-tflops for others).
Then it measures the fast data path on one CPU core and prints how many cores per GPU it takes to keep up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def flops_per_crop(width: int, crop: tuple[int, int]) -> float:
    """Forward + backward FLOPs of the U-Net for one crop, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from cityseg.model import UNet

    model = UNet(width=width).cuda()
    x = torch.randn(1, 3, *crop, device="cuda")
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return float(counter.get_total_flops())


def crops_per_second(root: Path, out: Path, width: int, crop: tuple[int, int], batch: int, steps: int,
                     channels_last: bool, compile_model: bool) -> float:
    """Crops/s of Trainer.train_step on fixed batches (the data path is measured separately)."""
    from cityseg import distributed as du
    from cityseg.config import TrainConfig
    from cityseg.engine import Trainer
    from cityseg.signals import StopFlag

    cfg = TrainConfig(data_root=str(root), out_dir=str(out), width=width, crop_size=f"{crop[0]}x{crop[1]}",
                      batch_size=batch, workers=0, device="cuda", amp="bf16", wandb="off", compile=compile_model,
                      num_pictures=0, cache_dir="none", max_iters=10_000, warmup_iters=0)
    ctx = du.init("cuda")
    trainer = Trainer(cfg, ctx, StopFlag())
    if not channels_last:
        trainer.channels_last = False
        trainer.model.to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, *crop, 3), generator=g, dtype=torch.uint8).pin_memory()
    labels = torch.randint(0, 19, (batch, *crop), generator=g, dtype=torch.uint8).pin_memory()
    for _ in range(5 if not compile_model else 10):  # warm-up (and compilation)
        trainer.train_step([(images, labels)])
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step([(images, labels)])
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    return batch / statistics.median(times)


def fast_loader_rate(root: Path, cache: Path, crop: tuple[int, int], n: int = 40) -> float:
    """Fast-path samples/s on one CPU core."""
    import cv2

    from cityseg.data import CityscapesDataset
    from cityseg.transforms import TrainTransform

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    ds = CityscapesDataset(root, "train", TrainTransform(crop, (0.5, 2.0), 0), cache_dir=cache)
    ds[(0, 0)]
    t0 = time.perf_counter()
    for i in range(n):
        ds[(0, i % len(ds))]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="Crops per GPU (the reference recipe's 4).")
    p.add_argument("--crop", default="512x1024")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of this GPU.")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu.py needs a CUDA GPU; on CPU run bench/run.py instead.")
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    from cityseg.prepare import prepare
    from cityseg.synthetic import write_tree

    with tempfile.TemporaryDirectory(prefix="cityseg-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = write_tree(tmp / "cs", num_train=8, num_val=1, num_test=0, size=(1024, 2048), seed=0)
        prepare(root, "train", tmp / "cache")
        flops = flops_per_crop(args.width, crop)
        rows = {}
        for label, cl, comp in (("bf16", False, False), ("bf16+channels_last", True, False),
                                ("bf16+channels_last+compile", True, True)):
            cps = crops_per_second(root, tmp / label, args.width, crop, args.batch, args.steps, cl, comp)
            rows[label] = {"crops_per_s": cps, "tflops": cps * flops / 1e12,
                           "mfu": cps * flops / 1e12 / peak if peak else None}
        loader = fast_loader_rate(root, tmp / "cache", crop)
    best = max(r["crops_per_s"] for r in rows.values())
    print(f"{name}: U-Net width {args.width}, {crop[0]}x{crop[1]}, batch {args.batch}, "
          f"{flops / 1e12:.2f} TFLOP per crop (forward + backward)")
    for label, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"  {label:<28} {r['crops_per_s']:7.1f} crops/s  {r['tflops']:6.1f} TFLOP/s  MFU {mfu}")
    print(f"fast data path: {loader:.1f} crops/s per CPU core -> {best / loader:.1f} cores per GPU to keep up")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "flops_per_crop": flops, "peak_tflops": peak,
                                               "rows": rows, "loader_crops_per_s_per_core": loader,
                                               "cores_per_gpu": best / loader}, indent=2) + "\n")


if __name__ == "__main__":
    main()
