"""Evaluation: the loop shared by training and evaluate.py (predictor, sharded loader, confusion matrix,
pictures). The evaluate.py job itself is :mod:`cityseg.eval_job`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import distributed as du
from .data import CityscapesDataset, ShardSampler, make_loader, worker_death
from .errors import DataError, UserError, one_line
from .inference import InferenceMode, predict
from .labels import NUM_CLASSES
from .metrics import ConfusionMatrix
from .precision import autocast
from .transforms import to_input, to_target
from .visualize import confusion_heatmap, iou_bars, panel, write_rgb


@dataclass
class Predictor:
    """A model with everything that says how to run it on full images."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    mode: InferenceMode = InferenceMode()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> predicted trainIds (N, H, W) on the device (the model in eval mode)."""
        return self.scores(images).argmax(1)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> class scores (N, C, H, W): logits, or with TTA the mean of the softmaxes."""
        was_training = self.model.training
        self.model.eval()  # running statistics, and no BatchNorm collectives: ranks may predict alone
        try:
            with autocast(self.device, self.dtype):
                x = to_input(images, self.device, self.channels_last)
                return predict(self.model, x, self.mode, NUM_CLASSES)
        finally:
            self.model.train(was_training)


OnBatch = Callable[[list[int], torch.Tensor, torch.Tensor], None]


class EvaluationStopped(Exception):
    """A stop signal reached a rank during the evaluation, which every rank gave up together."""


@torch.no_grad()
def evaluate(predictor: Predictor, loader: Any, on_batch: OnBatch | None = None,
             should_stop: Callable[[], bool] | None = None,
             progress: Callable[[], None] | None = None) -> ConfusionMatrix:
    """Confusion matrix over this rank's shard, all-reduced over ranks; ``on_batch(indices, labels, pred)``
    sees every prediction (for exports), ``progress()`` is told of every batch. A file that fails to load on any
    rank raises on every rank (after the collective, so no rank is left waiting in it); so does
    :class:`EvaluationStopped` when ``should_stop()`` said yes on any rank (checked before each batch)."""
    cm = ConfusionMatrix(NUM_CLASSES, predictor.device)
    error, stopped = "", False
    try:
        for images, labels, index in loader:
            if should_stop is not None and should_stop():
                stopped = True
                break
            pred = predictor(images)
            cm.update(pred, to_target(labels, predictor.device))
            if on_batch is not None:
                on_batch(index.tolist(), labels, pred)
            if progress is not None:
                progress()
    except UserError as e:
        error = one_line(e)
    except RuntimeError as e:
        error = worker_death(e, loader)
        if not error:
            raise
    cm.all_reduce()
    outcomes = du.all_gather_object((error, stopped))
    failed = [m for m, _ in outcomes if m]
    if failed:
        raise DataError(str(failed[0]), collective=True)
    if any(s for _, s in outcomes):
        raise EvaluationStopped()
    return cm


def val_loader(root: str, split: str, ctx: du.DistContext, workers: int, limit: int = 0, labels: bool = True):
    """Full-resolution, unaugmented loader over this rank's shard of ``split`` (each image exactly once)."""
    dataset = CityscapesDataset(root, split, labels=labels)
    sampler = ShardSampler(len(dataset), ctx.world_size, ctx.rank, limit)
    return make_loader(dataset, sampler, 1, workers, pin=ctx.device.type == "cuda"), dataset


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
