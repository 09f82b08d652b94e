"""Predictions in the official Cityscapes format, and the official evaluation script run on them."""

from __future__ import annotations

import copy
import io
import contextlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .labels import TRAIN_TO_ID
from .visualize import write_png

SUFFIX = "_leftImg8bit.png"


def prediction_path(export_dir: str | Path, sample_name: str) -> Path:
    """``DIR/<city>_<seq>_<frame>_leftImg8bit.png``: the name the official script and server look for."""
    return Path(export_dir) / f"{sample_name}{SUFFIX}"


def write_prediction(export_dir: str | Path, sample_name: str, train_ids: np.ndarray) -> Path:
    """Write one prediction as a single-channel labelId PNG (trainIds mapped back to Cityscapes ids)."""
    path = prediction_path(export_dir, sample_name)
    write_png(path, TRAIN_TO_ID[train_ids])
    return path


def official_scores(predictions: Sequence[str | Path], ground_truths: Sequence[str | Path]) -> dict[str, Any]:
    """Class and category IoU from cityscapesscripts' ``evalPixelLevelSemanticLabeling`` on these files."""
    # The script reads CITYSCAPES_DATASET and prints at import time; keep its output out of ours.
    with contextlib.redirect_stdout(io.StringIO()):
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

        args = copy.copy(official.args)
        args.evalInstLevelScore = False  # needs *_instanceIds.png, and is not the benchmark's class IoU
        args.evalPixelAccuracy = False
        args.JSONOutput = False
        args.quiet = True
        args.colorized = False
        result = official.evaluateImgLists([str(p) for p in predictions], [str(p) for p in ground_truths], args)
    class_scores, category_scores = result["classScores"], result["categoryScores"]
    return {
        "miou": official.getScoreAverage(class_scores, args),
        "iou": {k: _num(v) for k, v in class_scores.items() if not official.name2label[k].ignoreInEval},
        "category_miou": official.getScoreAverage(category_scores, args),
        "category_iou": {k: _num(v) for k, v in category_scores.items() if k != "void"},
    }


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)
