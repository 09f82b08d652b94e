"""CPU benchmark of cityseg's data path and training step; every goal is a ratio measured in this one run.

    python bench/run.py [--quick] [--json FILE]

On the same synthetic full-resolution (1024x2048) Cityscapes files it measures:
  loader samples/s on one core for a reference pipeline written the way torchvision's segmentation reference
  does it (PIL decode, resize the whole image, crop, flip, float normalisation on the CPU), our PNG path, our
  fast path (decoded memory-mapped cache, crop before resize), both also with the reference recipe's
  augmentation (crops retried while one class covers more than 75%, full photometric distortion), and two
  floors: PNG decode alone, and the irreducible work of the fast path (copy the source window's bytes,
  resample it once, exactly, to the crop);
  DDP weak scaling (2 processes x 1 thread against 1 process x 1 thread, same per-process batch), printed as
  information only: CPU runs are for the demo and the tests, users train on GPUs;
  the training-loop overhead of our step against a bare forward/backward/step loop;
  the cost of resuming at a late iteration against an early one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GOALS = {  # key: (comparison, target)
    "loader_fast_vs_reference": (">=", 20.0),
    "loader_png_vs_reference": (">=", 2.0),
    "loader_fast_recipe_vs_reference": (">=", 20.0),  # with the recipe's class-aware crops and full photometric
    "loader_png_recipe_vs_reference": (">=", 2.0),
    "loader_fast_vs_floor": ("<=", 1.5),
    "train_loop_overhead": ("<=", 0.03),
    "resume_late_vs_early": ("<=", 1.5),
}
CROP = (512, 1024)  # the reference recipe's crop
PARTS = ("loader", "ddp", "loop", "resume")


def one_core() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def rate(fn: Callable[[int], Any], n: int) -> float:
    """Calls per second of ``fn(i)`` over ``n`` calls (after one warm-up call)."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i + 1)
    return n / (time.perf_counter() - t0)


# -- loader ----------------------------------------------------------------------------------------------
def reference_sample(paths: list[tuple[Path, Path]], i: int, lut: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision-reference style: PIL decode, resize the whole image, pad, crop, flip, normalise on the CPU."""
    from PIL import Image

    rng = np.random.default_rng(i)
    img_path, lab_path = paths[i % len(paths)]
    image = Image.open(img_path).convert("RGB")
    label = Image.fromarray(lut[np.asarray(Image.open(lab_path))])
    s = rng.uniform(0.5, 2.0)
    size = (int(image.width * s), int(image.height * s))
    image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
    img, lab = np.asarray(image), np.asarray(label)
    ph, pw = max(CROP[0] - img.shape[0], 0), max(CROP[1] - img.shape[1], 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=255)
    top = rng.integers(0, img.shape[0] - CROP[0] + 1)
    left = rng.integers(0, img.shape[1] - CROP[1] + 1)
    img, lab = img[top:top + CROP[0], left:left + CROP[1]], lab[top:top + CROP[0], left:left + CROP[1]]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return x, torch.from_numpy(lab.copy()).long()


def loader_rates(root: Path, cache: Path, n: int) -> dict[str, float]:
    """Samples per second on one core for each pipeline and floor."""
    from cityseg.data import CityscapesDataset, _decode
    from cityseg.labels import ID_TO_TRAIN
    from cityseg.cache import DecodedCache
    from cityseg.transforms import TrainTransform

    transform = TrainTransform(CROP, (0.5, 2.0), seed=0)
    png = CityscapesDataset(root, "train", transform, cache_dir="none")
    fast = CityscapesDataset(root, "train", transform, cache_dir=cache)
    # the reference recipe's augmentation: crops retried while one class covers more than 75%, full photometric
    recipe = TrainTransform(CROP, (0.5, 2.0), seed=0, cat_max_ratio=0.75, photometric_kind="full")
    png_recipe = CityscapesDataset(root, "train", recipe, cache_dir="none")
    fast_recipe = CityscapesDataset(root, "train", recipe, cache_dir=cache)
    assert fast.cache is not None
    pairs = [(s.image, s.label) for s in png.samples]
    raw = DecodedCache(cache / "train")
    m = len(pairs)

    def floor_png(i: int) -> None:  # with the decoder our PNG path uses (libspng)
        img, lab = pairs[i % m]
        _decode(img, 3)
        _decode(lab, 1)

    def opencv_png(i: int) -> None:  # the same with OpenCV's libpng, for comparison
        img, lab = pairs[i % m]
        cv2.imdecode(np.fromfile(img, np.uint8), cv2.IMREAD_COLOR)
        cv2.imdecode(np.fromfile(lab, np.uint8), cv2.IMREAD_UNCHANGED)

    def window(i: int):
        """A sample's source window (the rows and columns its crop reads) and its crop geometry."""
        image, label = raw.load(i % m)
        scale, ((top, left),), _, _ = transform.params(image.shape[:2], 0, i % m)
        inv = 1 / scale
        y0, x0 = int(top * inv), int(left * inv)
        y1 = min(image.shape[0], int((top + CROP[0]) * inv) + 2)
        x1 = min(image.shape[1], int((left + CROP[1]) * inv) + 2)
        return image[y0:y1, x0:x1].copy(), label[y0:y1, x0:x1].copy(), scale

    def floor_fast(i: int) -> None:
        # the fast path's irreducible work: copy the window, resample it exactly once to the crop (one warp of
        # its 4-channel copy for the image, an index lookup for the label)
        win_img, win_lab, scale = window(i)
        m = np.array([[1 / scale, 0.0, 0.3], [0.0, 1 / scale, 0.3]])
        rgba = cv2.cvtColor(win_img, cv2.COLOR_RGB2RGBA)
        out = cv2.warpAffine(rgba, m, (CROP[1], CROP[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)
        rows = np.minimum((np.arange(CROP[0]) / scale).astype(int), win_lab.shape[0] - 1)
        cols = np.minimum((np.arange(CROP[1]) / scale).astype(int), win_lab.shape[1] - 1)
        np.take(np.take(win_lab, rows, axis=0), cols, axis=1)

    def floor_resize(i: int) -> None:
        # for comparison: the same with a plain resize of the window, whose grid can sit half a pixel off the
        # whole image's (what the fast path did before it sampled the exact grid)
        win_img, win_lab, scale = window(i)
        out = (min(CROP[1], int(win_img.shape[1] * scale)) or 1, min(CROP[0], int(win_img.shape[0] * scale)) or 1)
        cv2.resize(win_img, out, interpolation=cv2.INTER_LINEAR)
        cv2.resize(win_lab, out, interpolation=cv2.INTER_NEAREST)

    return {
        "reference": rate(lambda i: reference_sample(pairs, i, ID_TO_TRAIN), n),
        "png": rate(lambda i: png[(0, i % m)], n),
        "fast": rate(lambda i: fast[(0, i % m)], 4 * n),
        "png_recipe": rate(lambda i: png_recipe[(0, i % m)], n),
        "fast_recipe": rate(lambda i: fast_recipe[(0, i % m)], 4 * n),
        "floor_png_decode": rate(floor_png, n),
        "png_decode_opencv": rate(opencv_png, n),
        "floor_fast": rate(floor_fast, 4 * n),
        "floor_fast_resize": rate(floor_resize, 4 * n),
    }


# -- training step -----------------------------------------------------------------------------------------
def bench_config(root: Path, out: Path, width: int, crop: tuple[int, int], batch: int) -> Any:
    from cityseg.config import TrainConfig

    return TrainConfig(data_root=str(root), out_dir=str(out), width=width, crop_size=f"{crop[0]}x{crop[1]}",
                       batch_size=batch, workers=0, device="cpu", wandb="off", warmup_iters=0, eval_every=0,
                       num_pictures=0, max_val_images=1, cache_dir="none", max_iters=1000)


def fake_batch(cfg: Any, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.crop_hw
    images = torch.randint(0, 256, (cfg.batch_size, h, w, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 19, (cfg.batch_size, h, w), generator=g, dtype=torch.uint8)
    return [(images, labels)]


def step_time(cfg: Any, steps: int) -> float:
    """Median seconds per Trainer.train_step in this process (inside whatever process group is up)."""
    from cityseg import distributed as du
    from cityseg.engine import Trainer
    from cityseg.signals import StopFlag

    ctx = du.init("cpu")
    trainer = Trainer(cfg, ctx, StopFlag(ctx.control_group))
    batch = fake_batch(cfg, ctx.rank)
    trainer.train_step(batch)
    times = []
    for _ in range(steps):
        du.barrier()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ddp_worker(rank: int, world: int, port: int, cfg: Any, steps: int, out: str, group: bool) -> None:
    one_core()
    if group:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    from cityseg import distributed as du

    try:
        Path(f"{out}.{rank}").write_text(json.dumps({"step_s": step_time(cfg, steps)}))
    finally:
        du.teardown()


def ddp_efficiency(cfg: Any, steps: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """Per-step time of 1 and of 2 processes at the same per-process batch; efficiency = t1 / t2.

    Also the step time of 2 independent single processes side by side (no process group, nothing shared but
    the machine): what 2 processes could reach here with no distributed cost at all. The slower of the two
    is taken, since a synchronous job moves at the pace of its slowest rank.

    On a shared virtual machine the speed of a whole process pair drifts by several percent from one launch
    to the next, far more than from step to step; so the three are launched ``rounds`` times in turn and the
    median of the per-round figures is reported, each round's kept beside it.
    """
    import socket

    import torch.multiprocessing as mp

    per_round: list[dict[str, float]] = []
    for i in range(rounds):
        result: dict[str, float] = {}
        for name, world, group in (("1proc", 1, True), ("2proc", 2, True), ("2independent", 2, False)):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = tmp / f"ddp_{name}_{i}"
            mp.spawn(_ddp_worker, args=(world, port, cfg, steps, str(out), group), nprocs=world, join=True)
            runs = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
            result[f"step_s_{name}"] = max(r["step_s"] for r in runs)
        result["efficiency"] = result["step_s_1proc"] / result["step_s_2proc"]
        result["efficiency_of_independent"] = result["step_s_1proc"] / result["step_s_2independent"]
        per_round.append(result)
    median = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    return {**median, "rounds": per_round}


def loop_overhead(cfg: Any, steps: int) -> dict[str, float]:
    """Our training step against a bare forward/backward/step loop on the same model and batch."""
    import torch.nn.functional as F

    from cityseg import distributed as du
    from cityseg.engine import Trainer
    from cityseg.signals import StopFlag
    from cityseg.transforms import to_input

    ctx = du.init("cpu")
    trainer = Trainer(cfg, ctx, StopFlag())
    batch = fake_batch(cfg, 0)
    model, opt = trainer.model, trainer.optimizer
    x = to_input(batch[0][0], ctx.device, trainer.channels_last)
    y = batch[0][1].long()

    def bare() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, ignore_index=255).backward()
        opt.step()

    ours, plain = [], []
    bare(), trainer.train_step(batch)
    for _ in range(steps):  # interleaved, so drifts of the machine hit both alike
        t0 = time.perf_counter()
        trainer.train_step(batch)
        t1 = time.perf_counter()
        bare()
        plain.append(time.perf_counter() - t1)
        ours.append(t1 - t0)
    ours_s, bare_s = statistics.median(ours), statistics.median(plain)
    return {"ours_s": ours_s, "bare_s": bare_s, "overhead": ours_s / bare_s - 1}


def resume_cost(root: Path, tmp: Path, repeats: int) -> dict[str, float]:
    """Seconds from train() start to one finished step after resuming at iteration 10 and at 100,000."""
    from cityseg import checkpoint as ckpt
    from cityseg.engine import train

    cfg = bench_config(root, tmp / "resume", 8, (256, 512), 1)
    cfg.max_iters = 2
    train(cfg)
    base = ckpt.load(Path(cfg.out_dir) / "last.pt")
    spe = len(list((root / "leftImg8bit" / "train").glob("*/*.png")))

    def once(it: int) -> float:
        state = dict(base, iteration=it, epoch=it // spe, step_in_epoch=it % spe,
                     scheduler=dict(base["scheduler"], last_epoch=it))
        ckpt.save(state, Path(cfg.out_dir) / "last.pt")
        cfg.max_iters = it + 1
        t0 = time.perf_counter()
        train(cfg)
        return time.perf_counter() - t0

    early = statistics.median(once(10) for _ in range(repeats))
    late = statistics.median(once(100_000) for _ in range(repeats))
    return {"early_s": early, "late_s": late, "ratio": late / early}


# -- report ------------------------------------------------------------------------------------------------
def verdict(key: str, value: float) -> str:
    op, target = GOALS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{'met' if ok else 'MISSED'} (goal {op} {target:g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Fewer images and repetitions (under 3 minutes).")
    p.add_argument("--json", metavar="FILE", help="Also write the figures to FILE.")
    p.add_argument("--images", type=int, default=None, help="Full-resolution training images to generate.")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"Comma-separated parts to run (default: all of {','.join(PARTS)}).")
    args = p.parse_args()
    parts = [x for x in args.only.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--only takes a comma-separated subset of {','.join(PARTS)}, got {args.only!r}")
    one_core()
    n_img = max(args.images or (4 if args.quick else 8), 4)  # one global batch of the DDP measurement
    n = 6 if args.quick else 24
    t_start = time.perf_counter()
    from cityseg.prepare import prepare
    from cityseg.synthetic import write_tree

    figures: dict[str, float] = {}  # ratios with a goal
    info: dict[str, float] = {}  # ratios printed for information only
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cityseg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = write_tree(tmp / "cityscapes", num_train=n_img, num_val=1, num_test=0, size=(1024, 2048), seed=0)
        if "loader" in parts:
            prepare(root, "train", tmp / "cache")
            loader = details["loader_samples_per_s_one_core"] = loader_rates(root, tmp / "cache", n)
            figures["loader_fast_vs_reference"] = loader["fast"] / loader["reference"]
            figures["loader_png_vs_reference"] = loader["png"] / loader["reference"]
            figures["loader_fast_vs_floor"] = loader["floor_fast"] / loader["fast"]
            figures["loader_fast_recipe_vs_reference"] = loader["fast_recipe"] / loader["reference"]
            figures["loader_png_recipe_vs_reference"] = loader["png_recipe"] / loader["reference"]
            info["class_aware_crop_cost_fast"] = loader["fast"] / loader["fast_recipe"]  # time ratio
            info["exact_grid_cost"] = loader["floor_fast_resize"] / loader["floor_fast"]  # time ratio
            print(f"{'loader (samples/s, one core)':<34}" + "  ".join(f"{k} {v:.2f}" for k, v in loader.items()))
        if "ddp" in parts:
            ddp = details["ddp"] = ddp_efficiency(bench_config(root, tmp / "ddp", 16, (256, 512), 2),
                                                  4 if args.quick else 8, 1 if args.quick else 3, tmp)
            info["ddp_weak_scaling_efficiency"] = ddp["efficiency"]
            print(f"{'DDP step (s, median of rounds)':<34}1 proc {ddp['step_s_1proc']:.3f}  "
                  f"2 procs {ddp['step_s_2proc']:.3f}  2 independent procs {ddp['step_s_2independent']:.3f}")
            print(f"{'DDP efficiency of each round':<34}" + "  ".join(f"{r['efficiency']:.3f}" for r in ddp["rounds"])
                  + "  (independent: " + "  ".join(f"{r['efficiency_of_independent']:.3f}" for r in ddp["rounds"])
                  + ")")
        if "loop" in parts:
            overhead = details["train_loop"] = loop_overhead(bench_config(root, tmp / "loop", 16, (256, 512), 2),
                                                             5 if args.quick else 15)
            figures["train_loop_overhead"] = overhead["overhead"]
            print(f"{'train step (s)':<34}ours {overhead['ours_s']:.4f}  bare {overhead['bare_s']:.4f}")
        if "resume" in parts:
            resume = details["resume"] = resume_cost(root, tmp, 1 if args.quick else 3)
            figures["resume_late_vs_early"] = resume["ratio"]
            print(f"{'resume to first step (s)':<34}it 10: {resume['early_s']:.2f}  it 100,000: {resume['late_s']:.2f}")
    details.update({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch": torch.__version__, "python": platform.python_version()},
                    "quick": args.quick, "parts": parts, "full_res_images": n_img,
                    "seconds": time.perf_counter() - t_start})
    for key, value in figures.items():
        print(f"{key:<34}{value:8.3f}  {verdict(key, value)}")
    for key, value in info.items():
        print(f"{key:<34}{value:8.3f}  (information, no goal)")
    print(f"({details['seconds']:.0f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "information": info,
                                               "goals": {k: list(v) for k, v in GOALS.items()},
                                               "met": {k: verdict(k, v).startswith("met") for k, v in figures.items()},
                                               **details}, indent=2) + "\n")


if __name__ == "__main__":
    main()
