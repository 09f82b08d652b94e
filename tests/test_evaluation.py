"""evaluate.py: official-format export and agreement with cityscapesscripts, inference modes, pictures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from cityseg.inference import InferenceMode, predict, window_starts
from cityseg.labels import CLASS_NAMES, TRAIN_TO_ID
from cityseg.models.unet import UNet
from cityseg.visualize import ERROR_RGB, error_map
from conftest import TINY, assert_matches_reference, reference_scores, run_script
from wandb_log import read_run


def _evaluate(trained, root, out, *extra, nproc=0, check=True):
    return run_script("evaluate.py", ["--checkpoint", str(trained), "--data-root", str(root), "--out-dir", str(out),
                                      "--workers", "0", "--device", "cpu", "--num-pictures", "2", *extra],
                      nproc=nproc, check=check)


def test_official_script_agrees_with_ours_on_three_processes(trained, synthetic_root, tmp_path):
    # 5 val images over 3 processes (3 does not divide 5); cityscapesscripts reads the exported PNGs.
    proc = _evaluate(trained, synthetic_root, tmp_path, "--official", "--export-dir", str(tmp_path / "pred"), nproc=3)
    result = json.loads((tmp_path / "metrics.json").read_text())
    official = result["official"]
    predicted = [name for name, v in result["iou"].items() if v is not None and v > 0]
    assert len(predicted) >= 2, "the checkpoint should predict several classes for this test to mean much"
    assert abs(official["miou"] - result["miou"]) <= 1e-6
    assert abs(official["category_miou"] - result["category_miou"]) <= 1e-6
    for name in CLASS_NAMES:
        a, b = result["iou"][name], official["iou"][name]
        assert (a is None and b is None) or abs(a - b) <= 1e-6, name
    for name, v in result["category_iou"].items():
        assert v is None and official["category_iou"][name] is None or abs(v - official["category_iou"][name]) <= 1e-6
    assert "official cityscapesscripts: class mIoU" in proc.stdout
    assert len(list((tmp_path / "pred").iterdir())) == 5
    assert_matches_reference(result, reference_scores(trained, synthetic_root))


@pytest.mark.parametrize("nproc", [0, 2], ids=["python", "torchrun-2"])
def test_evaluation_does_not_depend_on_the_number_of_processes(trained, synthetic_root, tmp_path, nproc):
    # The same scores as an evaluation written independently, with one process, two, and (above) three: 5
    # images shard into 3+2 and 2+2+1, each image evaluated exactly once.
    _evaluate(trained, synthetic_root, tmp_path, nproc=nproc)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 5
    assert_matches_reference(metrics, reference_scores(trained, synthetic_root))


def test_a_checkpoint_with_or_without_the_auxiliary_head_evaluates_the_same(trained, synthetic_root, tmp_path):
    state = torch.load(trained, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("aux_head.")}
    state["config"]["aux_weight"] = 0.0
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    _evaluate(trained, synthetic_root, tmp_path / "aux", "--export-dir", str(tmp_path / "aux_pred"))
    _evaluate(plain, synthetic_root, tmp_path / "plain", "--export-dir", str(tmp_path / "plain_pred"))
    assert json.loads((tmp_path / "aux" / "metrics.json").read_text())["iou"] == \
        json.loads((tmp_path / "plain" / "metrics.json").read_text())["iou"]
    for p in sorted((tmp_path / "aux_pred").iterdir()):  # the very same predictions: the main head's
        assert p.read_bytes() == (tmp_path / "plain_pred" / p.name).read_bytes()


@pytest.mark.parametrize("extra", [[], ["--mode", "slide", "--window", "48x80", "--stride", "24x40",
                                        "--tta", "flip", "--scales", "0.75,1.0,1.25"]], ids=["whole", "slide-tta"])
def test_export_is_the_official_format_at_full_size(trained, synthetic_root, tmp_path, extra):
    _evaluate(trained, synthetic_root, tmp_path, "--export-dir", str(tmp_path / "pred"), *extra)
    images = sorted((synthetic_root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    exported = sorted((tmp_path / "pred").iterdir())
    assert [p.name for p in exported] == sorted(p.name for p in images)
    for img, pred in zip(sorted(images, key=lambda p: p.name), exported):
        assert re.fullmatch(r"[a-z]+_\d{6}_\d{6}_leftImg8bit\.png", pred.name)
        arr = cv2.imread(str(pred), cv2.IMREAD_UNCHANGED)
        assert arr.ndim == 2 and arr.dtype == np.uint8  # single channel
        assert arr.shape == cv2.imread(str(img)).shape[:2]  # full resolution whatever the mode
        assert set(np.unique(arr)) <= set(TRAIN_TO_ID[:19].tolist())  # Cityscapes ids, not trainIds


def test_test_split_is_export_only(trained, synthetic_root, tmp_path):
    proc = _evaluate(trained, synthetic_root, tmp_path, "--split", "test", check=False)
    assert proc.returncode == 2 and "--export-dir" in proc.stderr and "Traceback" not in proc.stderr
    proc = _evaluate(trained, synthetic_root, tmp_path, "--split", "test", "--export-dir", str(tmp_path / "test"))
    assert "no metrics are computed" in proc.stdout
    assert len(list((tmp_path / "test").glob("*_leftImg8bit.png"))) == 2
    assert not (tmp_path / "metrics.json").exists()


def test_a_window_larger_than_the_images_is_one_line(trained, synthetic_root, tmp_path):
    proc = _evaluate(trained, synthetic_root, tmp_path, "--mode", "slide", "--window", "64x256", "--stride",
                     "32x128", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: --window: got '64x256', larger than the images of split val (64x128); "
                                  "use at most 64x128, or --mode whole"), proc.stderr


def test_pictures_are_written(trained, synthetic_root, tmp_path):
    _evaluate(trained, synthetic_root, tmp_path, "--wandb", "offline")
    pics = tmp_path / "pictures"
    panels = sorted(pics.glob("*_panel.png"))
    assert len(panels) == 2
    h, w = 64, 128
    panel = cv2.imread(str(panels[0]))
    bar = max(18, h // 16)
    assert panel.shape == (2 * (h + bar), 2 * w, 3)
    assert cv2.imread(str(pics / "iou_per_class.png")) is not None
    assert cv2.imread(str(pics / "confusion_matrix.png")) is not None
    run = read_run(tmp_path / "wandb")  # predictions went to W&B as segmentation masks
    row = next(r for _, r in run["history"] if "val/predictions/_type" in r)
    assert row["val/predictions/_type"] == "images/separated" and row["val/predictions/count"] == 2
    masks = row["val/predictions/all_masks"]
    assert all(m["prediction"]["_type"] == "mask" and "ground_truth" in m for m in masks)
    assert row["val/iou_per_class/_type"] == row["val/confusion_matrix/_type"] == "image-file"


def test_error_map_marks_exactly_the_wrong_pixels():
    gt = np.array([[0, 1, 255], [2, 2, 3]], np.uint8)
    pred = np.array([[0, 2, 5], [2, 1, 3]], np.uint8)
    red = (error_map(gt, pred) == ERROR_RGB).all(-1)
    assert red.tolist() == [[False, True, False], [False, True, False]]


def test_images_mode_writes_overlays_for_any_size(trained, tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    g = np.random.default_rng(0)
    cv2.imwrite(str(src / "a.png"), g.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "b.jpg"), g.integers(0, 255, (100, 61, 3), dtype=np.uint8))
    run_script("evaluate.py", ["--checkpoint", str(trained), "--images", str(src), "--out-dir", str(tmp_path),
                               "--device", "cpu"])
    for stem, hw in (("a", (37, 53)), ("b", (100, 61))):
        assert cv2.imread(str(tmp_path / "overlays" / f"{stem}_overlay.png")).shape[:2] == hw
        assert cv2.imread(str(tmp_path / "overlays" / f"{stem}_pred.png")).shape[:2] == hw


# -- inference modes, in process -------------------------------------------------------------------------
class WindowMean(nn.Module):
    """Output = the mean of the input window, broadcast: its value depends on which window produced it."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(x.shape[0], 2, *x.shape[2:])


def test_window_starts_cover_and_end_flush():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 3) == [0]


@pytest.mark.quick
def test_overlapping_windows_cover_every_pixel_and_average():
    x = torch.arange(1 * 1 * 7 * 9, dtype=torch.float32).view(1, 1, 7, 9)
    mode = InferenceMode("slide", window=(4, 5), stride=(2, 3))
    out = predict(WindowMean(), x, mode, num_classes=2)
    # independent expectation: every pixel's value is the mean over the windows containing it
    expected = torch.zeros(7, 9)
    for i in range(7):
        for j in range(9):
            means = [x[0, 0, t:t + 4, l:l + 5].mean() for t in (0, 2, 3) for l in (0, 3, 4)
                     if t <= i < t + 4 and l <= j < l + 5]
            assert means, (i, j)
            expected[i, j] = torch.stack(means).mean()
    torch.testing.assert_close(out[0, 0], expected)


def test_window_covering_the_image_equals_whole_mode():
    torch.manual_seed(0)
    model = UNet(width=8).eval()
    x = torch.randn(1, 3, 48, 80)
    whole = predict(model, x, InferenceMode("whole"), 19)
    slide = predict(model, x, InferenceMode("slide", window=(48, 80), stride=(16, 16)), 19)
    assert torch.equal(whole, slide)


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 19, 3, padding=1)
    with torch.no_grad():  # a horizontally symmetric kernel makes the model commute with flips
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    x = torch.randn(2, 3, 16, 24)
    plain = predict(conv, x, InferenceMode(), 19).softmax(1)
    flipped = predict(conv, x, InferenceMode(flip=True), 19)
    torch.testing.assert_close(flipped, plain)
    asym = nn.Conv2d(3, 19, 3, padding=1)  # and a model that is not equivariant gives something else
    assert not torch.allclose(predict(asym, x, InferenceMode(flip=True), 19), predict(asym, x, InferenceMode(), 19).softmax(1))


class ScaleProbe(nn.Module):
    """Logits that depend on the scale the model sees: class 0 grows with the input's width, class 1 with a
    horizontal ramp of the input, class 2 is constant."""

    def forward(self, x):
        n, _, h, w = x.shape
        ramp = torch.linspace(0, 1, w).expand(n, h, w)
        return torch.stack([torch.full((n, h, w), w / 40.0), x[:, 0] * ramp, torch.zeros(n, h, w)], dim=1)


def test_multiscale_tta_is_the_mean_of_resize_model_resize_back():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 37, 61, generator=g)
    scales = (0.75, 1.0, 1.5)
    out = predict(ScaleProbe(), x, InferenceMode(scales=scales, flip=True), 3)
    # independent expectation: for each scale and flip, resize the image, run the model, flip back, resize the
    # logits to the input size, softmax; then the mean
    probs = []
    for s in scales:
        xs = x if s == 1.0 else nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = ScaleProbe()(xs.flip(-1) if flip else xs)
            logits = logits.flip(-1) if flip else logits
            logits = nn.functional.interpolate(logits, size=(37, 61), mode="bilinear", align_corners=False)
            probs.append(logits.softmax(1))
    torch.testing.assert_close(out, torch.stack(probs).mean(0))
    assert out.shape == (1, 3, 37, 61)
    single = predict(ScaleProbe(), x, InferenceMode(flip=True), 3)  # and the scales matter for this model
    assert (out - single).abs().max() > 0.05


def test_a_second_writer_of_an_export_dir_is_refused_and_writes_nothing(trained, synthetic_root, tmp_path, capsys):
    """Two `evaluate.py --official` into one --export-dir would mix their PNGs, and score the mix."""
    from cityseg.runlock import RunLock

    export = tmp_path / "pred"
    export.mkdir()
    holder = RunLock(export, flag="--export-dir", kind="evaluate.py writing predictions")
    holder.acquire()  # a live evaluation on this host owns it
    try:
        proc = _evaluate(trained, synthetic_root, tmp_path / "out", "--official", "--export-dir", str(export),
                         check=False)
    finally:
        holder.release()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --export-dir {export}: another evaluate.py writing predictions owns this "
                                  f"directory (host "), proc.stderr
    assert f"pid {holder.record['pid']}," in proc.stderr
    assert list(export.iterdir()) == [] and not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.quick
def test_an_official_score_that_differs_from_ours_by_more_than_1e6_is_a_failure(synthetic_root, tmp_path):
    from cityseg.eval_job import OutputError, _check_official
    from cityseg.export import official_scores

    gts = sorted((synthetic_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    official = official_scores(gts, gts)  # the ground truth as predictions: the official script's own figure
    _check_official({"miou": official["miou"] - 5e-7, "official": official}, tmp_path)  # rounding: fine
    with pytest.raises(OutputError) as e:
        _check_official({"miou": official["miou"] - 2e-6, "official": official}, tmp_path)
    assert f"the PNGs in {tmp_path} are not all this evaluation's" in str(e.value) and "2.0e-06" in str(e.value)
