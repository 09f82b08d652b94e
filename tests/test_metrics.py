"""Confusion matrix and Cityscapes scores against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cityseg.labels import NUM_CLASSES
from cityseg.metrics import ConfusionMatrix, format_table, scores

NAMES = ("a", "b", "c", "d")


def test_confusion_matrix_counts_pairs_and_skips_ignore():
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 3], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    cm.update(pred[:1], target[:1])
    expected = np.zeros((4, 4), np.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (2, 2), (2, 0), (2, 2), (1, 1)] + [(0, 0), (0, 1), (1, 1)]:
        expected[t, p] += 1
    assert cm.mat.dtype == torch.int64
    np.testing.assert_array_equal(cm.mat.numpy(), expected)


def test_scores_follow_cityscapes_rules():
    # rows = ground truth, cols = prediction
    mat = np.array([[3, 1, 0, 0],   # a: tp 3, gt 4, pred 3+0 -> union 4+3-3=4 -> 0.75
                    [0, 2, 0, 2],   # b: tp 2, gt 4, pred 1+2=3 -> union 5 -> 0.4
                    [0, 0, 0, 0],   # c: no gt, no pred -> NaN, left out of the mean
                    [0, 0, 0, 0]])  # d: no gt but predicted twice -> IoU 0, counted
    r = scores(mat, NAMES)
    assert r["iou"] == {"a": 0.75, "b": 0.4, "c": None, "d": 0.0}
    assert math.isclose(r["miou"], (0.75 + 0.4 + 0.0) / 3)
    assert math.isclose(r["pixel_acc"], 5 / 8)
    assert math.isclose(r["mean_acc"], (3 / 4 + 2 / 4) / 2)  # accuracy only over classes with ground truth
    assert r["acc"]["d"] is None and r["num_pixels"] == 8


def test_empty_matrix_has_no_scores():
    r = scores(np.zeros((4, 4), np.int64), NAMES)
    assert r["miou"] is None and r["pixel_acc"] is None and set(r["iou"].values()) == {None}


@pytest.mark.quick
def test_table_lists_all_classes_and_handles_missing():
    mat = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    mat[0, 0] = 10
    text = format_table(scores(mat))
    assert "road" in text and "bicycle" in text and "n/a" in text and "100.00" in text


@pytest.mark.quick
@pytest.mark.parametrize("seed", [0, 1])
def test_update_matches_numpy_reference(seed):
    g = np.random.default_rng(seed)
    target = g.integers(0, NUM_CLASSES, (2, 16, 16))
    target[g.random(target.shape) < 0.2] = 255
    pred = g.integers(0, NUM_CLASSES, (2, 16, 16))
    cm = ConfusionMatrix()
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    ref = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(ref, (target[target != 255], pred[target != 255]), 1)
    np.testing.assert_array_equal(cm.mat.numpy(), ref)


def test_category_iou_folds_classes_into_categories():
    mat = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    mat[0, 0] = 4   # road -> road
    mat[1, 0] = 2   # sidewalk -> road: wrong class, right category (flat)
    mat[13, 14] = 3  # car -> truck: right category (vehicle)
    mat[10, 0] = 1  # sky -> road: wrong category
    r = scores(mat)
    assert r["category_iou"]["flat"] == 6 / 7       # tp 6, fp 1 (the sky pixel)
    assert r["category_iou"]["vehicle"] == 1.0
    assert r["category_iou"]["sky"] == 0.0          # ground truth present, never predicted
    assert r["category_iou"]["human"] is None       # neither
    assert math.isclose(r["category_miou"], (6 / 7 + 1.0 + 0.0) / 3)
    assert list(r["category_iou"]) == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
