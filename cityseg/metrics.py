"""Confusion matrix on the device, all-reduced once, and the Cityscapes scores computed from it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import distributed as du
from .labels import CATEGORY_NAMES, CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, TRAIN_LABELS


class ConfusionMatrix:
    """``mat[gt, pred]`` pixel counts (int64) accumulated on the device of the predictions."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu"):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` hold class indices; target 255 (ignore) is skipped."""
        keep = target != IGNORE_INDEX
        idx = target[keep].long() * self.n + pred[keep].long()
        self.mat += torch.bincount(idx, minlength=self.n * self.n).view(self.n, self.n)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrices of all ranks (one collective)."""
        du.all_reduce_sum(self.mat)
        return self

    def compute(self) -> dict[str, Any]:
        """Scores of the accumulated matrix (see :func:`scores`)."""
        return scores(self.mat.cpu().numpy())


def _iou(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp = np.diag(mat)
    gt = mat.sum(axis=1)
    union = gt + mat.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan), np.where(gt > 0, tp / gt, np.nan)


def category_matrix(mat: np.ndarray) -> np.ndarray:
    """Fold the 19x19 class matrix into the 7x7 matrix of the Cityscapes categories (flat, ..., vehicle)."""
    cat = np.array([CATEGORY_NAMES.index(lab.category) for lab in TRAIN_LABELS])
    out = np.zeros((len(CATEGORY_NAMES), len(CATEGORY_NAMES)), dtype=mat.dtype)
    np.add.at(out, (cat[:, None], cat[None, :]), mat)
    return out


def scores(mat: np.ndarray, names: tuple[str, ...] = CLASS_NAMES) -> dict[str, Any]:
    """Per-class IoU, mIoU, pixel accuracy and mean class accuracy by the official Cityscapes rules.

    A class with neither ground truth nor prediction has IoU ``None`` and is left out of the mean; a class
    that is predicted but absent from the ground truth has IoU 0. For the 19 Cityscapes classes the
    category IoU (flat, construction, object, nature, sky, human, vehicle) is reported too, as the official
    script does.
    """
    mat = mat.astype(np.float64)
    iou, acc = _iou(mat)
    total = mat.sum()
    result = {
        "miou": _nanmean(iou),
        "iou": {name: _num(v) for name, v in zip(names, iou)},
        "pixel_acc": float(np.diag(mat).sum() / total) if total > 0 else None,
        "mean_acc": _nanmean(acc),
        "acc": {name: _num(v) for name, v in zip(names, acc)},
        "num_pixels": int(total),
        "confusion": mat.astype(np.int64).tolist(),  # rows: ground truth, columns: prediction
    }
    if tuple(names) == CLASS_NAMES:
        cat_iou, _ = _iou(category_matrix(mat))
        result["category_miou"] = _nanmean(cat_iou)
        result["category_iou"] = {name: _num(v) for name, v in zip(CATEGORY_NAMES, cat_iou)}
    return result


def _nanmean(v: np.ndarray) -> float | None:
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of per-class IoU and the summary scores."""
    lines = [f"{'class':<16}{'IoU':>8}{'acc':>8}"]
    for name, v in result["iou"].items():
        acc = result["acc"][name]
        lines.append(f"{name:<16}{_pct(v):>8}{_pct(acc):>8}")
    lines.append("-" * 32)
    lines.append(f"{'mIoU':<16}{_pct(result['miou']):>8}")
    lines.append(f"{'pixel acc':<16}{_pct(result['pixel_acc']):>8}")
    lines.append(f"{'mean class acc':<16}{_pct(result['mean_acc']):>8}")
    if "category_iou" in result:
        lines.append("-" * 32)
        lines.append(f"{'category':<16}{'IoU':>8}")
        lines += [f"{name:<16}{_pct(v):>8}" for name, v in result["category_iou"].items()]
        lines.append(f"{'category mIoU':<16}{_pct(result['category_miou']):>8}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"
