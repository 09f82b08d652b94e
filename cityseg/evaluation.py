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
from .config import ConfigError, EvalConfig, from_dict
from .data import CityscapesDataset, ShardSampler, make_loader, read_image, shutdown
from .errors import DataError, UserError, one_line
from .export import official_scores, prediction_path, write_prediction
from .inference import InferenceMode, predict
from .labels import NUM_CLASSES, colorize
from .logger import RunLogger, resolve_wandb_mode
from .metrics import ConfusionMatrix, format_table
from .model import build_model, inference_weights
from .precision import amp_dtype, autocast
from .transforms import to_input, to_target
from .visualize import confusion_heatmap, iou_bars, overlay, panel, write_rgb


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
    sees every prediction (for exports). A file that fails to load on any rank raises on every rank (after the
    collective, so no rank is left waiting in it)."""
    cm = ConfusionMatrix(NUM_CLASSES, predictor.device)
    error = ""
    try:
        for images, labels, index in loader:
            pred = predictor(images)
            cm.update(pred, to_target(labels, predictor.device))
            if on_batch is not None:
                on_batch(index.tolist(), labels, pred)
    except UserError as e:
        error = one_line(e)
    cm.all_reduce()
    failed = [m for m in du.all_gather_object(error) if m]
    if failed:
        raise DataError(str(failed[0]), collective=True)
    return cm


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
    model = build_model(width)  # without the auxiliary head of training, if it had one
    try:
        model.load_state_dict(inference_weights(state["model"]))
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
    # cuDNN autotuning pays off when the images share one size (a Cityscapes split); --images may give many
    torch.backends.cudnn.benchmark = not cfg.images
    with du.session(cfg.device) as ctx:
        model, state = load_model(cfg.checkpoint, ctx.device)
        mode = InferenceMode(cfg.mode, cfg.window_hw, cfg.stride_hw, cfg.tta == "flip", cfg.scale_list())
        predictor = Predictor(model, ctx.device, amp_dtype(cfg.amp, ctx.device), True, mode)
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
    if cfg.mode == "slide":
        _check_window(cfg, dataset)
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


def _check_window(cfg: EvalConfig, dataset: CityscapesDataset) -> None:
    """A sliding window must fit the split's images (Cityscapes images all have one size; the first tells)."""
    h, w = dataset.load(0)[0].shape[:2]
    if cfg.window_hw[0] > h or cfg.window_hw[1] > w:
        raise ConfigError(f"--window: got {cfg.window!r}, larger than the images of split {cfg.split} ({h}x{w}); "
                          f"use at most {h}x{w}, or --mode whole", field="window")


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
    log = RunLogger(out, enabled=True, metrics_file="eval_metrics.jsonl", log_file="eval.log")  # not the run's
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
