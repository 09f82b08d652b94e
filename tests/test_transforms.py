"""Crop-before-resize augmentation and the decoded cache: same samples whichever path reads them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cityseg.data import CityscapesDataset, DataError, TrainSampler, make_loader
from cityseg.prepare import main as prepare_main
from cityseg.transforms import TrainTransform, scaled_crop


def _resize_pad_crop(src, scale, top, left, hw, interp, fill):
    """What the augmentation means, computed the slow way: resize everything, pad, crop."""
    h, w = src.shape[:2]
    big = cv2.resize(src, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    ph, pw = max(top + hw[0] - big.shape[0], 0), max(left + hw[1] - big.shape[1], 0)
    pad = ((0, ph), (0, pw)) + (((0, 0),) if src.ndim == 3 else ())
    big = np.pad(big, pad, constant_values=fill)
    return big[top:top + hw[0], left:left + hw[1]]


@pytest.mark.parametrize("scale, top, left", [(1.0, 5, 7), (1.7, 30, 90), (0.6, 0, 3), (0.5, 10, 0)])
def test_scaled_crop_matches_resize_then_crop(scale, top, left):
    g = np.random.default_rng(0)
    image = cv2.GaussianBlur(g.integers(0, 256, (96, 160, 3), dtype=np.uint8), (7, 7), 2)  # smooth, like photos
    label = np.repeat(np.repeat(g.integers(0, 19, (6, 10), dtype=np.uint8), 16, 0), 16, 1)  # 16-pixel regions
    hw = (48, 80)
    fast = scaled_crop(image, scale, top, left, hw, cv2.INTER_LINEAR, 0)
    slow = _resize_pad_crop(image, scale, top, left, hw, cv2.INTER_LINEAR, 0)
    assert fast.shape == slow.shape == (48, 80, 3)
    if scale == 1.0:
        assert np.array_equal(fast, slow)  # a plain crop, bit for bit
    assert np.abs(fast.astype(int) - slow).mean() < 3  # the window's grid may sit half a pixel off
    lf = scaled_crop(label, scale, top, left, hw, cv2.INTER_NEAREST_EXACT, 255)
    # pixel-centre nearest neighbour (cv2.INTER_NEAREST_EXACT; plain INTER_NEAREST is shifted by half a pixel)
    ls = _resize_pad_crop(label, scale, top, left, hw, cv2.INTER_NEAREST_EXACT, 255)
    assert abs((lf == 255).mean() - (ls == 255).mean()) < 0.03  # padding in (nearly) the same place
    assert (lf == ls).mean() > 0.95  # up to half a pixel of shift at region borders


def test_cache_path_gives_the_same_samples_as_png(synthetic_root, tmp_path):
    prepare_main(["--data-root", str(synthetic_root), "--split", "train", "--cache-dir", str(tmp_path / "c")])
    t = TrainTransform((64, 128), seed=3)
    png = CityscapesDataset(synthetic_root, "train", t, cache_dir="none")
    fast = CityscapesDataset(synthetic_root, "train", t, cache_dir=tmp_path / "c")
    assert png.cache is None and fast.cache is not None

    def batches(ds, workers):
        sampler = TrainSampler(len(ds), 2, 1, 0, seed=1)
        sampler.set_epoch(2)
        return [b[:2] for b in make_loader(ds, sampler, 2, workers, pin=False, drop_last=True)]

    for (a_img, a_lab), (b_img, b_lab) in zip(batches(png, 0), batches(fast, 2)):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)


def test_stale_cache_is_an_error(synthetic_root, tmp_path):
    prepare_main(["--data-root", str(synthetic_root), "--split", "val", "--cache-dir", str(tmp_path / "c")])
    (tmp_path / "c" / "val").rename(tmp_path / "c" / "train")  # a cache of other images
    with pytest.raises(DataError, match="lists other images"):
        CityscapesDataset(synthetic_root, "train", cache_dir=tmp_path / "c")
