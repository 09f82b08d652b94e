"""GPU benchmark of the reference recipe (4 crops of 512x1024 per GPU, U-Net width 64): the training step, the
whole training loop, full-resolution evaluation, and optionally a short training curve.

    python bench/gpu.py [--json FILE] [--out-dir DIR] [--only step,loop,eval] [--rows ROW,...] [--curve-minutes 5]

- step: crops/s, model FLOP utilisation (MFU) and peak memory of cityseg's own Trainer.train_step, one row per
  configuration (STEP_ROWS; --rows picks some): bf16 eager in the NCHW layout and in channels_last, eager with
  cityseg's synchronised BatchNorm as multi-GPU training runs it, and compiled (--no-compile leaves it out).
  FLOPs per crop (forward and backward) come from torch's FLOP counter; MFU is against the GPU's dense bf16 peak,
  looked up by its exact name in PEAK_BF16_TFLOPS (H100 SXM and H200: 989 TFLOP/s; H100 PCIe 756; NVL cards 835;
  --peak-tflops for others). A row below the 40% goal gets torch.profiler's top kernels, each marked with what
  bounds it.
- loop: train.py on a full-resolution synthetic tree, through the decoded cache with 8 workers, against the
  step alone (loop_vs_step = the loop's images/s over the channels_last row's crops/s).
- eval: full-resolution (1024x2048) bf16 evaluation, whole image, images/s including loading.
- curve (--curve-minutes N): train.py for about N minutes on full-resolution synthetic data with the recipe's
  crop and batch, evaluating on the way: loss and mIoU against iterations, as JSON and a PNG.

With --json the results file is rewritten after every row and part, so a run cut short keeps what it measured;
a row or part that fails is recorded with its error and the others still run (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: Dense bf16 tensor-core peaks (TFLOP/s) by the exact name torch.cuda.get_device_name() gives, from NVIDIA's
#: datasheets (half of their "with sparsity" figures). PCIe and NVL cards run at lower clocks and power than the
#: SXM modules of the same chip, so a name is matched whole, never by a substring.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,   # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.4,             # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.1,
}
GOALS = {"mfu_best": (">=", 0.40), "loop_vs_step": (">=", 0.95), "eval_images_per_s": (">=", 50.0)}
CROP = (512, 1024)
# kernels whose time is mostly arithmetic; the rest (normalisation, activations, copies, reductions) mostly
# moves memory
COMPUTE_BOUND = ("gemm", "conv", "cutlass", "xmma", "wgrad", "dgrad", "fprop", "sm90", "sm80", "implicit")


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One configuration of the training step that the step benchmark times."""

    what: str  #: what the row measures, for people
    channels_last: bool = True  #: the model's weights and its inputs in channels_last (else NCHW, contiguous)
    sync_bn: bool = False  #: cityseg's synchronised BatchNorm (CUDASyncBatchNorm) instead of cuDNN's
    compiled: bool = False  #: torch.compile, as --compile


#: The step benchmark's rows by name (--rows), in the order they run.
STEP_ROWS = {
    "eager_nchw": StepRow("bf16, eager, NCHW (contiguous) weights and inputs", channels_last=False),
    "eager_channels_last": StepRow("bf16, eager, channels_last: train.py on one GPU"),
    "eager_syncbn": StepRow("bf16, eager, channels_last, CUDASyncBatchNorm as multi-GPU training runs it (one "
                            "rank: its kernels, no all-reduce)", sync_bn=True),
    "compiled_channels_last": StepRow("bf16, torch.compile, channels_last: train.py --compile on one GPU",
                                      compiled=True),
}
#: The row the loop is compared with: what train.py runs.
PLAIN_ROW = "eager_channels_last"


def trainer_for(root: Path, out: Path, width: int, batch: int, row: StepRow, device: str = "cuda") -> Any:
    """cityseg's Trainer at the reference recipe's step (bf16, SGD), on one device, configured as ``row`` says."""
    from cityseg import distributed as du
    from cityseg.config import TrainConfig
    from cityseg.engine import Trainer, set_determinism
    from cityseg.signals import StopFlag

    set_determinism(False)  # cuDNN autotuning, as train.py runs
    cfg = TrainConfig(data_root=str(root), out_dir=str(out), width=width, crop_size=f"{CROP[0]}x{CROP[1]}",
                      batch_size=batch, workers=0, device=device, amp="bf16", wandb="off", compile=row.compiled,
                      num_pictures=0, cache_dir="none", max_iters=10_000, warmup_iters=0)
    trainer = Trainer(cfg, du.init(device), StopFlag())
    if not row.channels_last or row.sync_bn:
        remodel(trainer, row.channels_last, row.sync_bn)
    return trainer


def remodel(trainer: Any, channels_last: bool, sync_bn: bool) -> None:
    """Give a new one-process Trainer's model another memory format and/or the synchronised BatchNorm, then build
    its optimizer and schedule again, for the final parameters.

    The order matters: build_optimizer gives each SGD momentum buffer its parameter's strides, and CUDA's fused SGD
    refuses a step whose parameters, gradients and buffers differ in strides (a model made NCHW after its optimizer
    was built keeps channels_last buffers); converted BatchNorm layers are new parameters, which the first
    optimizer would never update."""
    from cityseg.optim import build_optimizer, lr_factor
    from cityseg.syncbn import convert_sync_batchnorm

    assert trainer.iteration == 0 and trainer.ema is None and trainer.ddp is trainer.model, "a new one-process Trainer"
    cfg, device = trainer.cfg, trainer.ctx.device
    model = convert_sync_batchnorm(trainer.model, device) if sync_bn else trainer.model
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainer.model = trainer.ddp = model
    trainer.forward = torch.compile(model) if cfg.compile else model
    trainer.channels_last = channels_last  # the inputs' layout
    trainer.predictor = dataclasses.replace(trainer.predictor, model=model, channels_last=channels_last)
    trainer.optimizer = build_optimizer(cfg, model, device)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda it: lr_factor(it, cfg))


def select_rows(names: str | None, compile_row: bool, parts: set[str]) -> list[str]:
    """The step rows to run: ``names`` (comma-separated; all by default), without the compiled one under
    --no-compile, and with the channels_last row whenever the loop or the curve is compared with it."""
    chosen = names.split(",") if names else list(STEP_ROWS)
    unknown = [n for n in chosen if n not in STEP_ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown row {', '.join(unknown)}; the rows are {', '.join(STEP_ROWS)}")
    if not compile_row:
        chosen = [n for n in chosen if not STEP_ROWS[n].compiled]
    if parts & {"loop", "curve"} and PLAIN_ROW not in chosen:
        chosen.append(PLAIN_ROW)
    return [n for n in STEP_ROWS if n in chosen]


def fixed_batch(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, *CROP, 3), generator=g, dtype=torch.uint8).pin_memory(),
             torch.randint(0, 19, (batch, *CROP), generator=g, dtype=torch.uint8).pin_memory())]


def flops_per_crop(width: int) -> float:
    """Forward + backward FLOPs of the U-Net for one crop, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from cityseg.models.unet import UNet

    model = UNet(width=width).cuda()
    x = torch.randn(1, 3, *CROP, device="cuda")
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return float(counter.get_total_flops())


def measure_step(trainer: Any, batch: list, steps: int, warmup: int) -> dict[str, float]:
    """Median crops/s over 3 timed runs of ``steps`` steps, and the peak memory of the step."""
    for _ in range(warmup):
        trainer.train_step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    n = batch[0][0].shape[0]
    return {"crops_per_s": n / statistics.median(times), "step_s": statistics.median(times),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def profile_top_kernels(trainer: Any, batch: list, top: int = 12) -> list[dict[str, Any]]:
    """The kernels that take most GPU time in a few steps, each labelled compute- or memory-bound."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            trainer.train_step(batch)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1.0
    return [{"kernel": e.key[:120], "share": e.device_time_total / total, "calls": e.count,
             "bound": "compute" if any(k in e.key.lower() for k in COMPUTE_BOUND) else "memory"}
            for e in events[:top]]


def bench_step(root: Path, tmp: Path, args: argparse.Namespace, rows: list[str], peak: float | None,
               save: Callable[[], None]) -> dict[str, Any]:
    """Every row of ``rows``, each in a Trainer of its own; ``save`` after each (a failed row records its error)."""
    result: dict[str, Any] = {"flops_per_crop": flops_per_crop(args.width), "rows": {}}
    data = fixed_batch(args.batch)
    for name in rows:
        row = STEP_ROWS[name]
        try:
            result["rows"][name] = measure_row(root, tmp / name, args, row, data, result["flops_per_crop"], peak)
        except Exception as e:  # noqa: BLE001 -- one row's defect must not cost the other rows' figures
            traceback.print_exc()
            result["rows"][name] = {"what": row.what, "error": error_line(e)}
        torch.cuda.empty_cache()
        best = best_row(result["rows"])
        result.update(best=best, mfu_best=result["rows"][best]["mfu"] if best else None)
        save()
    return result


def measure_row(root: Path, out: Path, args: argparse.Namespace, row: StepRow, data: list, flops: float,
                peak: float | None) -> dict[str, Any]:
    """One row: crops/s, TFLOP/s, MFU and peak memory, and the top kernels when below the MFU goal."""
    trainer = trainer_for(root, out, args.width, args.batch, row)
    try:
        measured = measure_step(trainer, data, args.steps, warmup=10 if row.compiled else 5)
        tflops = measured["crops_per_s"] * flops / 1e12
        result = {"what": row.what, **measured, "tflops": tflops, "mfu": tflops / peak if peak else None}
        if peak and result["mfu"] < GOALS["mfu_best"][1]:
            result["top_kernels"] = profile_top_kernels(trainer, data)
        return result
    finally:
        trainer.log.close()


def best_row(rows: dict[str, Any]) -> str | None:
    """The fastest measured row of those the MFU goal is about (the synchronised BatchNorm's is for comparison)."""
    measured = [n for n, r in rows.items() if "crops_per_s" in r and not STEP_ROWS[n].sync_bn]
    return max(measured, key=lambda n: rows[n]["crops_per_s"]) if measured else None


# -- data ------------------------------------------------------------------------------------------------------
def full_resolution_tree(root: Path, num_train: int, num_val: int) -> Path:
    """A synthetic Cityscapes tree of 1024x2048 images, written by several processes at once."""
    from cityseg.synthetic import write_tree

    write_tree(root, num_train=num_train, num_val=num_val, num_test=0, size=(1024, 2048), seed=0,
               workers=os.cpu_count() or 1)
    return root


def tree_size(parts: set[str], args: argparse.Namespace) -> tuple[int, int]:
    """Train and val images the parts need: the step only builds a Trainer on its tree (its batches are fixed)."""
    train = args.train_images if parts & {"loop", "curve"} else args.batch
    val = args.val_images if parts & {"eval", "curve"} else 1
    return train, val


def train_cmd(root: Path, out: Path, width: int, batch: int, iters: int, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--data-root", str(root), "--out-dir", str(out), "--width", str(width),
            "--crop-size", f"{CROP[0]}x{CROP[1]}", "--batch-size", str(batch), "--max-iters", str(iters),
            "--device", "cuda", "--amp", "bf16", "--wandb", "off", "--num-pictures", "0", *extra]


def bench_loop(root: Path, tmp: Path, width: int, batch: int, step_crops_per_s: float) -> dict[str, Any]:
    """train.py through the decoded cache with 8 workers, against the step alone at the same configuration."""
    subprocess.run([sys.executable, "-m", "cityseg.prepare", "--data-root", str(root), "--split", "train"],
                   cwd=REPO, check=True, capture_output=True)
    out = tmp / "loop"
    iters, log_every = 160, 20
    proc = subprocess.run(train_cmd(root, out, width, batch, iters, "--workers", "8", "--log-every", str(log_every),
                                    "--eval-every", "0", "--ckpt-every", "0", "--warmup-iters", "0"),
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"bench/gpu.py: train.py failed:\n{proc.stderr[-3000:]}")
    rates = [r["train/images_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "train/images_per_s" in r]
    loop = statistics.median(rates[1:])  # the first window holds the workers' start and cuDNN's autotuning
    return {"loop_images_per_s": loop, "step_crops_per_s": step_crops_per_s,
            "loop_vs_step": loop / step_crops_per_s, "windows": rates}


def bench_eval(root: Path, width: int, workers: int = 8) -> dict[str, Any]:
    """Full-resolution whole-image bf16 evaluation over the val split, images/s including loading."""
    from cityseg import distributed as du
    from cityseg.evaluation import Predictor, evaluate, val_loader
    from cityseg.models.unet import UNet

    ctx = du.init("cuda")
    torch.backends.cudnn.benchmark = True  # as evaluate.py sets it for whole-image evaluation
    model = UNet(width=width).cuda().to(memory_format=torch.channels_last).eval()
    predictor = Predictor(model, ctx.device, torch.bfloat16, True)
    loader, dataset = val_loader(str(root), "val", ctx, workers)
    evaluate(predictor, loader)  # warm-up: workers, cuDNN
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2):
        evaluate(predictor, loader)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"eval_images_per_s": 2 * len(dataset) / seconds, "images": len(dataset), "workers": workers}


def bench_curve(root: Path, tmp: Path, width: int, batch: int, minutes: float, step_s: float,
                out_dir: Path) -> dict[str, Any]:
    """About ``minutes`` of train.py with the recipe's crop and batch on full-resolution synthetic data."""
    iters = max(50, int(minutes * 60 / (step_s * 1.15)))  # the loop runs a little slower than the step alone
    every = max(10, iters // 6)
    out = tmp / "curve"
    t0 = time.perf_counter()
    subprocess.run(train_cmd(root, out, width, batch, iters, "--workers", "8", "--log-every", "10",
                             "--eval-every", str(every), "--ckpt-every", "0", "--warmup-iters", "100",
                             "--config", "cityseg/configs/cityscapes_unet.yaml", "--max-val-images", "8"),
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = {"iterations": iters, "minutes": (time.perf_counter() - t0) / 60,
             "loss": [(r["iteration"], r["train/loss"]) for r in records if "train/loss" in r],
             "miou": [(r["iteration"], r["val/miou"]) for r in records if "val/miou" in r]}
    plot_curve(curve, out_dir / "curve_gpu.png")
    return curve


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*zip(*curve["loss"]), label="train loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot(*zip(*curve["miou"]), "o-", color="tab:red", label="val mIoU")
    twin.set_ylabel("val mIoU")
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- report ----------------------------------------------------------------------------------------------------
def verdict(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, target = GOALS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{'met' if ok else 'MISSED'} (goal {op} {target:g})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (parts and rows by name) before anything needs a GPU."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="Crops per GPU (the reference recipe's 4).")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="Timed steps per run of the step benchmark.")
    p.add_argument("--train-images", type=int, default=32, help="Full-resolution images for the loop and curve.")
    p.add_argument("--val-images", type=int, default=24, help="Full-resolution images for the evaluation.")
    p.add_argument("--only", default="step,loop,eval", help="Comma-separated parts: step, loop, eval, curve.")
    p.add_argument("--rows", default=None, help="Comma-separated rows of the step benchmark (default: all): "
                   + "; ".join(f"{name}: {row.what}" for name, row in STEP_ROWS.items()) + ".")
    p.add_argument("--curve-minutes", type=float, default=0.0, help="Also train this long for a learning curve.")
    p.add_argument("--peak-tflops", type=float, default=None, help="Dense bf16 peak of this GPU (default: from the "
                   "table of exact GPU names in this file).")
    p.add_argument("--no-compile", action="store_true", help="Leave out the compiled row of the step benchmark "
                   "(its compilation takes a minute or more).")
    p.add_argument("--json", metavar="FILE", help="Write the results here, after every row and part.")
    p.add_argument("--out-dir", default=".", help="Where the curve's picture goes.")
    args = p.parse_args(argv)
    args.parts = set(args.only.split(",")) | ({"curve"} if args.curve_minutes else set())
    unknown = args.parts - {"step", "loop", "eval", "curve"}
    if unknown:
        p.error(f"--only: unknown part {', '.join(sorted(unknown))}; the parts are step, loop, eval, curve")
    try:
        args.row_names = select_rows(args.rows, not args.no_compile, args.parts) \
            if args.parts & {"step", "loop", "curve"} else []
    except ValueError as e:
        p.error(str(e))
    return args


def add_figures(result: dict[str, Any]) -> None:
    """The goals' figures from what has been measured so far, and whether each is met."""
    step = result.get("step") or {}
    figures = {"mfu_best": step.get("mfu_best"),
               "loop_vs_step": result.get("loop", {}).get("loop_vs_step"),
               "eval_images_per_s": result.get("eval", {}).get("eval_images_per_s")}
    result["figures"] = figures
    result["met"] = {k: verdict(k, v).startswith("met") for k, v in figures.items() if v is not None}


def write_json(path: str, result: dict[str, Any]) -> None:
    """Replace ``path`` whole with the results, so that a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def error_line(e: BaseException) -> str:
    """An exception as one line for the results file (its traceback goes to stderr)."""
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def print_step(name: str, args: argparse.Namespace, step: dict[str, Any]) -> None:
    """The step benchmark's rows as a table, and the best row's top kernels when it has them."""
    print(f"{name}: U-Net width {args.width}, {CROP[0]}x{CROP[1]}, batch {args.batch}, "
          f"{step['flops_per_crop'] / 1e12:.3f} TFLOP per crop (forward + backward)")
    for label, row in step["rows"].items():
        if "error" in row:
            print(f"  {label:<24} FAILED: {row['error']}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(f"  {label:<24} {row['crops_per_s']:7.1f} crops/s  {row['tflops']:6.1f} TFLOP/s  MFU {mfu}  "
              f"peak memory {row['peak_memory_gib']:.1f} GiB")
    for k in step["rows"].get(step.get("best") or "", {}).get("top_kernels", []):
        print(f"    {100 * k['share']:5.1f}%  {k['bound']:<7}  {k['kernel']}")


def run_part(result: dict[str, Any], key: str, work: Callable[[], dict[str, Any]], save: Callable[[], None]) -> None:
    """``result[key] = work()``, or the error it raised; saved either way."""
    try:
        result[key] = work()
    except Exception as e:  # noqa: BLE001 -- a failed part must not cost the other parts' figures
        traceback.print_exc()
        result[key] = {"error": error_line(e)}
    finally:
        save()


def plain_row(result: dict[str, Any]) -> dict[str, Any]:
    """The measured channels_last row, which the loop and the curve are compared with."""
    row = result.get("step", {}).get("rows", {}).get(PLAIN_ROW, {})
    if "crops_per_s" not in row:
        raise RuntimeError(f"the step row {PLAIN_ROW} was not measured, so there is nothing to compare with")
    return row


def run_parts(args: argparse.Namespace, root: Path, tmp: Path, peak: float | None, result: dict[str, Any],
              save: Callable[[], None]) -> None:
    """The step rows, then the loop, the evaluation and the curve, as ``args`` asks; each saved as it ends."""
    if args.row_names:
        result["step"] = bench_step(root, tmp, args, args.row_names, peak, save)
        print_step(result["device"], args, result["step"])
    if "loop" in args.parts:
        run_part(result, "loop", lambda: bench_loop(root, tmp, args.width, args.batch,
                                                    plain_row(result)["crops_per_s"]), save)
        if "loop_images_per_s" in result["loop"]:
            print(f"loop: {result['loop']['loop_images_per_s']:.1f} images/s through train.py, "
                  f"step alone {result['loop']['step_crops_per_s']:.1f} crops/s")
    if "eval" in args.parts:
        run_part(result, "eval", lambda: bench_eval(root, args.width), save)
        if "eval_images_per_s" in result["eval"]:
            print(f"eval: {result['eval']['eval_images_per_s']:.1f} full-resolution images/s (bf16, whole image, "
                  f"loading included)")
    if "curve" in args.parts:
        run_part(result, "curve", lambda: bench_curve(root, tmp, args.width, args.batch, args.curve_minutes or 5,
                                                      plain_row(result)["step_s"], Path(args.out_dir)), save)
        if "miou" in result["curve"]:
            print(f"curve: {result['curve']['iterations']} iterations in {result['curve']['minutes']:.1f} min; "
                  f"val mIoU " + ", ".join(f"{it}: {100 * m:.1f}%" for it, m in result["curve"]["miou"]))


def failures(result: dict[str, Any]) -> list[str]:
    """The rows and parts that recorded an error."""
    return [k for k, r in result.get("step", {}).get("rows", {}).items() if "error" in r] + \
        [k for k in ("loop", "eval", "curve") if "error" in result.get(k, {})]


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts; 0 when every row and part was measured, 1 when one failed (its error is recorded)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu.py needs a CUDA GPU; on CPU run bench/run.py instead.")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or PEAK_BF16_TFLOPS.get(name)
    print(f"{name}: dense bf16 peak " + (f"{peak:g} TFLOP/s ({'--peak-tflops' if args.peak_tflops else 'table'})"
                                          if peak else "unknown (not in the table; pass --peak-tflops for MFU)"))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                              "peak_bf16_tflops": peak, "batch": args.batch, "crop": list(CROP), "width": args.width}
    t_start = time.perf_counter()

    def save() -> None:
        result["seconds"] = time.perf_counter() - t_start
        add_figures(result)
        if args.json:
            write_json(args.json, result)

    with tempfile.TemporaryDirectory(prefix="cityseg-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = full_resolution_tree(tmp / "cityscapes", *tree_size(args.parts, args))
        run_parts(args, root, tmp, peak, result, save)
    save()
    for key, value in result["figures"].items():
        if value is not None:
            print(f"{key:<22}{value:10.3f}  {verdict(key, value)}")
    failed = failures(result)
    print(f"bench/gpu.py: {'failed: ' + ', '.join(failed) if failed else 'done'} ({result['seconds']:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
