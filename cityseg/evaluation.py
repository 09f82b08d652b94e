"""Evaluation: the loop shared by evaluate.py and training, and the evaluate.py job itself."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as du
from .config import ConfigError, check_choices, from_dict, option, parse_hw
from .data import CityscapesDataset, DataError, ShardSampler, make_loader, read_image, shutdown
from .export import official_scores, prediction_path, write_prediction
from .inference import InferenceMode, predict
from .labels import NUM_CLASSES, colorize
from .logger import RunLogger, resolve_wandb_mode
from .metrics import ConfusionMatrix, format_table
from .model import build_model
from .precision import amp_dtype, autocast
from .transforms import to_input, to_target
from .visualize import confusion_heatmap, iou_bars, overlay, panel, write_rgb


@dataclass
class EvalConfig:
    """Evaluate a checkpoint on a Cityscapes split at full resolution (or predict your own images)."""

    checkpoint: str = option("", "Checkpoint to evaluate (a last.pt or best.pt written by train.py).")
    data_root: str = option("", "Cityscapes root (holding leftImg8bit/ and gtFine/, or the *_trainvaltest wrappers).")
    split: str = option("val", "Split to evaluate; test has no public labels, so it is export-only.")
    out_dir: str = option("", "Where metrics.json and pictures go; empty = the checkpoint's directory.")
    workers: int = option(4, "DataLoader worker processes per process.")
    device: str = option("auto", "Device type; auto = cuda when available.", ("auto", "cuda", "cpu"))
    amp: str = option("auto", "Mixed precision; auto = bf16 on CUDA where supported, off on CPU.",
                      ("auto", "bf16", "fp16", "off"))
    max_images: int = option(0, "Evaluate at most this many images (0 = all).")
    mode: str = option("whole", "Inference on the whole image, or in sliding windows.", ("whole", "slide"))
    window: str = option("512x1024", "Sliding window size HxW (--mode slide).")
    stride: str = option("341x683", "Sliding window stride HxW (--mode slide); overlapping logits are averaged.")
    tta: str = option("none", "Test-time augmentation: average with the horizontally flipped image.",
                      ("none", "flip"))
    scales: str = option("1.0", "Comma-separated image scales whose predictions are averaged, e.g. "
                                "0.75,1.0,1.25,1.5,1.75.")
    export_dir: str = option("", "Write one labelId PNG per image here, in the official Cityscapes format.")
    official: bool = option(False, "Also run cityscapesscripts' evalPixelLevelSemanticLabeling on the exported "
                                   "predictions (into --export-dir, or OUT/predictions) and report both.")
    num_pictures: int = option(4, "Write image|ground truth|prediction|errors panels for the first N images.")
    images: str = option("", "Predict these images instead (a directory or a glob) and write colour overlays.")
    wandb: str = option("off", "Log metrics and pictures to Weights & Biases.", ("off", "auto", "online", "offline"))
    wandb_project: str = option("cityseg", "W&B project.")
    wandb_entity: str = option("", "W&B entity (team or user); empty uses your default.")

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required: pass the last.pt or best.pt of a training run.")
        if not self.data_root and not self.images:
            raise ConfigError("--data-root is required: pass your Cityscapes root (or --images for your own).")
        parse_hw(self.window, "--window")
        parse_hw(self.stride, "--stride")
        self.scale_list()

    def scale_list(self) -> tuple[float, ...]:
        """``--scales`` as floats."""
        try:
            values = tuple(float(s) for s in self.scales.split(",") if s.strip())
        except ValueError:
            values = ()
        if not values or any(v <= 0 for v in values):
            raise ConfigError(f"--scales must be positive numbers separated by commas, got {self.scales!r}.")
        return values

    def inference_mode(self) -> InferenceMode:
        """The :class:`InferenceMode` these flags describe."""
        return InferenceMode(self.mode, parse_hw(self.window, "--window"), parse_hw(self.stride, "--stride"),
                             self.tta == "flip", self.scale_list())


@dataclass
class Predictor:
    """A model with everything that says how to run it on full images."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    mode: InferenceMode = InferenceMode()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> predicted trainIds (N, H, W) on the device (the model in eval mode)."""
        was_training = self.model.training
        self.model.eval()  # running statistics, and no BatchNorm collectives: ranks may predict alone
        try:
            with autocast(self.device, self.dtype):
                x = to_input(images, self.device, self.channels_last)
                return predict(self.model, x, self.mode, NUM_CLASSES).argmax(1)
        finally:
            self.model.train(was_training)


OnBatch = Callable[[list[int], torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def evaluate(predictor: Predictor, loader: Any, on_batch: OnBatch | None = None) -> ConfusionMatrix:
    """Confusion matrix over this rank's shard, all-reduced over ranks; ``on_batch(indices, labels, pred)``
    sees every prediction (for exports)."""
    cm = ConfusionMatrix(NUM_CLASSES, predictor.device)
    for images, labels, index in loader:
        pred = predictor(images)
        cm.update(pred, to_target(labels, predictor.device))
        if on_batch is not None:
            on_batch(index.tolist(), labels, pred)
    return cm.all_reduce()


def val_loader(root: str, split: str, ctx: du.DistContext, workers: int, limit: int = 0, labels: bool = True):
    """Full-resolution, unaugmented loader over this rank's shard of ``split`` (each image exactly once)."""
    dataset = CityscapesDataset(root, split, labels=labels)
    sampler = ShardSampler(len(dataset), ctx.world_size, ctx.rank, limit)
    return make_loader(dataset, sampler, 1, workers, pin=ctx.device.type == "cuda"), dataset


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Build the U-Net a checkpoint describes and load its weights."""
    state = ckpt.load(path)
    if "config" not in state:
        raise ckpt.CheckpointError(f"{path}: has no saved config; it was not written by cityseg's train.py.")
    width = from_dict(state["config"]).width
    model = build_model(width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: weights do not fit a width-{width} U-Net ({e}).") from e
    return model.to(device, memory_format=torch.channels_last).eval(), state  # as in training


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# -- pictures ------------------------------------------------------------------------------------------
@dataclass
class Pictures:
    """What a person looks at: panels of the first images, per-class IoU bars, the confusion heatmap."""

    samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]  # name, image, ground truth, prediction
    bars: np.ndarray
    heatmap: np.ndarray

    def save(self, out_dir: Path) -> None:
        """Write them as PNG under ``out_dir``."""
        for name, image, gt, pred in self.samples:
            write_rgb(out_dir / f"{name}_panel.png", panel(image, gt, pred))
        write_rgb(out_dir / "iou_per_class.png", self.bars)
        write_rgb(out_dir / "confusion_matrix.png", self.heatmap)


def make_pictures(predictor: Predictor, dataset: CityscapesDataset, result: dict[str, Any], mat: np.ndarray,
                  count: int) -> Pictures:
    """Predict the first ``count`` images again (on this rank alone) and draw the charts."""
    samples = []
    for i in range(min(count, len(dataset))):
        image, gt = dataset.load(i)
        pred = predictor(torch.from_numpy(image)[None])[0].to(torch.uint8).cpu().numpy()
        samples.append((dataset.samples[i].name, image, gt, pred))
    return Pictures(samples, iou_bars(result), confusion_heatmap(mat))


# -- the evaluate.py job -------------------------------------------------------------------------------
def run_evaluation(cfg: EvalConfig) -> dict[str, Any] | None:
    """The evaluate.py job: shard the split over ranks, all-reduce once, report on rank 0."""
    with du.session(cfg.device) as ctx:
        model, state = load_model(cfg.checkpoint, ctx.device)
        predictor = Predictor(model, ctx.device, amp_dtype(cfg.amp, ctx.device), True, cfg.inference_mode())
        out = Path(cfg.out_dir or Path(cfg.checkpoint).parent)
        if cfg.images:
            return predict_images(predictor, cfg.images, out / "overlays", ctx)
        return _evaluate_split(cfg, ctx, predictor, state, out)


def _evaluate_split(cfg: EvalConfig, ctx: du.DistContext, predictor: Predictor, state: dict[str, Any],
                    out: Path) -> dict[str, Any] | None:
    test = cfg.split == "test"
    export_dir = Path(cfg.export_dir) if cfg.export_dir else (out / "predictions" if cfg.official else None)
    if test and export_dir is None:
        raise ConfigError("the test split has no public labels, so nothing can be scored; pass --export-dir DIR "
                          "to write predictions for the Cityscapes benchmark server.")
    loader, dataset = val_loader(cfg.data_root, cfg.split, ctx, cfg.workers, cfg.max_images, labels=not test)
    on_batch = None
    if export_dir is not None:
        export_dir.mkdir(parents=True, exist_ok=True)

        def on_batch(indices: list[int], labels: torch.Tensor, pred: torch.Tensor) -> None:
            for i, p in zip(indices, pred.to(torch.uint8).cpu().numpy()):
                write_prediction(export_dir, dataset.samples[i].name, p)
    try:
        cm = evaluate(predictor, loader, on_batch)
    finally:
        shutdown(loader)
    du.barrier()  # every rank's exports are on disk
    if not ctx.is_main:
        return None
    evaluated = dataset.samples[: len(dataset) if not cfg.max_images else cfg.max_images]
    if test:
        print(f"{cfg.split}: wrote {len(evaluated)} predictions to {export_dir}; no metrics are computed "
              f"(the test labels are not public: submit the files to the Cityscapes benchmark server).")
        return {"exported": len(evaluated), "export_dir": str(export_dir)}
    result = cm.compute()
    result.update(split=cfg.split, checkpoint=str(cfg.checkpoint), iteration=state.get("iteration"),
                  num_images=len(evaluated), mode=cfg.mode, tta=cfg.tta, scales=list(cfg.scale_list()))
    if cfg.official:
        result["official"] = official_scores([prediction_path(export_dir, s.name) for s in evaluated],
                                             [s.label for s in evaluated])
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "metrics.json")
    pictures = make_pictures(predictor, dataset, result, cm.mat.cpu().numpy(), cfg.num_pictures)
    pictures.save(out / "pictures")
    _report(cfg, result, out, ctx, export_dir)
    _log_wandb(cfg, result, pictures, state, out)
    return result


def _report(cfg: EvalConfig, result: dict[str, Any], out: Path, ctx: du.DistContext, export_dir: Path | None) -> None:
    print(format_table(result))
    if "official" in result:
        off = result["official"]
        diff = abs(off["miou"] - result["miou"]) if off["miou"] is not None and result["miou"] is not None else 0
        print(f"official cityscapesscripts: class mIoU {_fmt(off['miou'])}, category mIoU "
              f"{_fmt(off['category_miou'])} (ours {_fmt(result['miou'])}, difference {diff:.2e})")
    if export_dir is not None:
        print(f"predictions in the official format: {export_dir}")
    print(f"{cfg.split}: mIoU {_fmt(result['miou'])} over {result['num_images']} images "
          f"({ctx.world_size} process{'es' if ctx.world_size > 1 else ''}); wrote {out / 'metrics.json'} "
          f"and pictures in {out / 'pictures'}")


def _log_wandb(cfg: EvalConfig, result: dict[str, Any], pictures: Pictures, state: dict[str, Any],
               out: Path) -> None:
    mode = resolve_wandb_mode(cfg.wandb)
    if mode == "off":
        return
    log = RunLogger(out, enabled=True, metrics_file="eval_metrics.jsonl")
    try:
        log.start_wandb(mode, {**state["config"], "eval": {f.name: getattr(cfg, f.name) for f in fields(cfg)}},
                        None, cfg.wandb_project, cfg.wandb_entity, f"eval-{Path(cfg.checkpoint).parent.name}",
                        job_type="eval")
        step = int(state.get("iteration") or 0)
        log.log(step, {f"{cfg.split}/miou": result["miou"], f"{cfg.split}/pixel_acc": result["pixel_acc"]})
        log.log_pictures(step, cfg.split, pictures)
    finally:
        log.close()


def predict_images(predictor: Predictor, pattern: str, out_dir: Path, ctx: du.DistContext) -> dict[str, Any]:
    """Predict arbitrary images (any size) and write ``<name>_overlay.png`` and ``<name>_pred.png``."""
    path = Path(pattern).expanduser()
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")) \
        if path.is_dir() else sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise DataError(f"--images {pattern}: no .png/.jpg/.jpeg/.bmp images found; pass a directory or a glob.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files[ctx.rank::ctx.world_size]:
        image = read_image(f)
        pred = predictor(torch.from_numpy(image)[None])[0].to(torch.uint8).cpu().numpy()
        write_rgb(out_dir / f"{f.stem}_overlay.png", overlay(image, pred))
        write_rgb(out_dir / f"{f.stem}_pred.png", colorize(pred))
    du.barrier()
    if ctx.is_main:
        print(f"wrote colour overlays of {len(files)} images to {out_dir}")
    return {"images": len(files), "out_dir": str(out_dir)}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
