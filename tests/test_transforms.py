"""The augmentation: crop before resize against resize-then-crop, class-aware crops, photometric ranges, and the
decoded cache giving the same samples as the PNGs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cityseg.data import CityscapesDataset, DataError, TrainSampler, make_loader
from cityseg.prepare import main as prepare_main
from cityseg.transforms import CROP_TRIES, TrainTransform, class_share_ok, photometric, scaled_crop


def _resize_pad_crop(src, scale, top, left, hw, interp, fill):
    """What the augmentation means, computed the slow way: resize everything, pad, crop."""
    h, w = src.shape[:2]
    big = cv2.resize(src, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    ph, pw = max(top + hw[0] - big.shape[0], 0), max(left + hw[1] - big.shape[1], 0)
    pad = ((0, ph), (0, pw)) + (((0, 0),) if src.ndim == 3 else ())
    big = np.pad(big, pad, constant_values=fill)
    return big[top:top + hw[0], left:left + hw[1]]


def _nearest_exact(src, scale, top, left, hw, fill):
    """Labels the slow way, in exact integer arithmetic: scaled pixel y takes source row floor((y + 0.5) * h/sh)."""
    h, w = src.shape[:2]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.full(hw, fill, src.dtype)
    for i in range(min(hw[0], sh - top)):
        for j in range(min(hw[1], sw - left)):
            out[i, j] = src[(2 * (top + i) + 1) * h // (2 * sh), (2 * (left + j) + 1) * w // (2 * sw)]
    return out


@pytest.mark.parametrize("scale, top, left", [(1.0, 5, 7), (1.7, 30, 90), (0.6, 0, 3), (0.5, 10, 0),
                                              (1.33, 17, 41), (0.77, 3, 9), (2.0, 150, 250)])
def test_scaled_crop_is_resize_then_crop_within_rounding(scale, top, left):
    g = np.random.default_rng(0)
    image = cv2.GaussianBlur(g.integers(0, 256, (96, 160, 3), dtype=np.uint8), (7, 7), 2)  # smooth, like photos
    label = g.integers(0, 19, (96, 160), dtype=np.uint8)  # every pixel its own class: any shift shows
    hw = (48, 80)
    fast = scaled_crop(image, scale, top, left, hw, cv2.INTER_LINEAR, 0)
    slow = _resize_pad_crop(image, scale, top, left, hw, cv2.INTER_LINEAR, 0)
    # cv2.resize and cv2.warpAffine round their bilinear weights differently: at most one grey level apart
    assert fast.shape == slow.shape == (48, 80, 3) and np.abs(fast.astype(int) - slow).max() <= 1
    shifted = _resize_pad_crop(image, scale, top, left + 1, hw, cv2.INTER_LINEAR, 0)
    assert np.abs(fast.astype(int) - shifted).max() > 4  # a window one pixel off would fail the bound
    labels = scaled_crop(label, scale, top, left, hw, cv2.INTER_NEAREST, 255)
    assert np.array_equal(labels, _nearest_exact(label, scale, top, left, hw, 255))
    if scale == 1.0:
        assert np.array_equal(fast, slow) and np.array_equal(labels, label[top:top + 48, left:left + 80])


def test_class_aware_crops_satisfy_the_bound_when_a_window_does():
    # A scene dominated by one class (road below, sky above, a little of three others): most random windows
    # are more than 75% one class, some are not.
    label = np.full((128, 256), 0, np.uint8)
    label[:40] = 10
    label[40:64, 30:90], label[44:60, 150:170], label[50:70, 200:240] = 2, 11, 13
    label[:, 250:] = 255  # ignored pixels do not count
    image = np.zeros((128, 256, 3), np.uint8)
    t = TrainTransform((48, 64), (0.8, 1.6), seed=0, cat_max_ratio=0.75, photometric_kind="none")
    retried = 0
    for index in range(60):
        scale, windows, _, _ = t.params(label.shape, 0, index)
        assert len(windows) == CROP_TRIES
        crops = [scaled_crop(label, scale, top, left, (48, 64), cv2.INTER_NEAREST, 255) for top, left in windows]
        ok = [class_share_ok(c, 0.75) for c in crops]
        _, got = t(image, label, 0, index)
        got = got[:, ::-1] if not any(np.array_equal(got, c) for c in crops) else got  # undo the flip
        if any(ok):
            assert class_share_ok(got, 0.75), index
            assert np.array_equal(got, crops[ok.index(True)]), index  # the first good window
            retried += not ok[0]
        else:
            assert np.array_equal(got, crops[-1]), index  # no good window: the last one
    assert retried >= 5  # the test saw windows rejected and retried, not only first tries
    plain = TrainTransform((48, 64), (0.8, 1.6), seed=0, photometric_kind="none")
    assert len(plain.params(label.shape, 0, 0)[1]) == 1
    assert plain.params(label.shape, 0, 3)[1][0] == t.params(label.shape, 0, 3)[1][0]  # same first window


def _run(transform, image, seed):
    transform.set_random_seed(seed)
    return transform(image=image)["image"]


def test_full_photometric_distortion_stays_within_mmsegmentations_ranges():
    full = photometric("full")
    # A grey image: saturation and hue leave grey alone, so only brightness (+-32) and contrast (x0.5-1.5) act,
    # in either order: every output lies in [min, max] of those, and the extremes are reached.
    grey = np.full((8, 8, 3), 128, np.uint8)
    values = np.array([_run(full, grey, s)[0, 0, 0] for s in range(400)], dtype=int)
    lowest, highest = min((128 - 32) * 0.5, 128 * 0.5 - 32), max((128 + 32) * 1.5, 128 * 1.5 + 32)
    assert lowest - 1 <= values.min() and values.max() <= highest + 1
    # wider than the mild jitter can reach (77-179 here), and each part often off
    assert values.min() < 70 and values.max() > 200 and (values == 128).mean() > 0.1
    # A pure red image: brightness, contrast and saturation keep its hue; hue moves by at most 18 of OpenCV's 180.
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 100  # dark enough that no channel clips at 255, which would move the hue
    hues = []
    for s in range(400):
        h = int(cv2.cvtColor(_run(full, red, s), cv2.COLOR_RGB2HSV)[0, 0, 0])
        hues.append(h if h < 90 else h - 180)
    assert max(abs(h) for h in hues) <= 19 and max(hues) >= 14 and min(hues) <= -14
    # The parameters albumentations drew, read back: the saturation factor of every run in 0.5-1.5.
    factors = []
    for s in range(200):
        factors += [p["saturation"] for name, p in _applied(full, grey, s) if name == "ColorJitter"]
    assert factors and min(factors) >= 0.5 and max(factors) <= 1.5 and max(factors) - min(factors) > 0.8


def _applied(transform, image, seed):
    """(name, parameters) of each transform that ``transform``, seeded with ``seed``, applied to ``image``."""
    import albumentations as A

    traced = A.Compose(transform.transforms, save_applied_params=True)
    traced.set_random_seed(seed)
    return traced(image=image)["applied_transforms"]


@pytest.mark.quick
@pytest.mark.parametrize("options", [{}, {"cat_max_ratio": 0.75, "photometric_kind": "full"}],
                         ids=["default", "class-aware+full"])
def test_cache_path_gives_the_same_samples_as_png(synthetic_root, tmp_path, options):
    prepare_main(["--data-root", str(synthetic_root), "--split", "train", "--cache-dir", str(tmp_path / "c")])
    t = TrainTransform((64, 128), seed=3, **options)
    png = CityscapesDataset(synthetic_root, "train", t, cache_dir="none")
    fast = CityscapesDataset(synthetic_root, "train", t, cache_dir=tmp_path / "c")
    assert png.cache is None and fast.cache is not None

    def batches(ds, workers):
        sampler = TrainSampler(len(ds), 2, 1, 0, seed=1)
        sampler.set_epoch(2)
        return [b[:2] for b in make_loader(ds, sampler, 2, workers, pin=False, drop_last=True)]

    a, b = batches(png, 0), batches(fast, 2)
    assert len(a) == len(b) == 4  # 8 images, batches of 2
    for (a_img, a_lab), (b_img, b_lab) in zip(a, b):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)


def test_stale_cache_is_an_error(synthetic_root, tmp_path):
    prepare_main(["--data-root", str(synthetic_root), "--split", "val", "--cache-dir", str(tmp_path / "c")])
    (tmp_path / "c" / "val").rename(tmp_path / "c" / "train")  # a cache of other images
    with pytest.raises(DataError, match="lists other images"):
        CityscapesDataset(synthetic_root, "train", cache_dir=tmp_path / "c")
