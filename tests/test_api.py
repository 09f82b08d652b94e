"""Using a trained model: ``cityseg.load(...).predict(...)`` against evaluate.py's exports, its inputs and errors,
the ONNX export under onnxruntime, and the quickstart notebook executed top to bottom."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import cityseg
from cityseg import checkpoint as ckpt
from cityseg.errors import UserError
from conftest import REPO, TINY, run_script


def _val_images(root: Path) -> list[Path]:
    return sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))


@pytest.mark.parametrize("options, flags", [
    ({}, []),
    ({"mode": "slide", "window": "32x64", "stride": "16x48", "tta": "flip", "scales": (0.75, 1.0)},
     ["--mode", "slide", "--window", "32x64", "--stride", "16x48", "--tta", "flip", "--scales", "0.75,1.0"]),
], ids=["whole", "slide-flip-multiscale"])
def test_predict_equals_the_pngs_evaluate_exports(trained, synthetic_root, tmp_path, options, flags):
    run_script("evaluate.py", ["--checkpoint", str(trained), "--data-root", str(synthetic_root), "--device", "cpu",
                               "--workers", "0", "--num-pictures", "0", "--out-dir", str(tmp_path),
                               "--export-dir", str(tmp_path / "pred"), *flags])
    seg = cityseg.load(trained, device="cpu", **options)
    assert seg.checkpoint["weights"] == "ema"  # the moving average, as evaluate.py's --use-ema auto
    paths = _val_images(synthetic_root)
    masks = seg.predict(paths)  # a list: batched internally
    for path, mask in zip(paths, masks):
        exported = cv2.imread(str(tmp_path / "pred" / path.name), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == exported.shape
        assert np.array_equal(cityseg.to_label_ids(mask), exported), path.name


@pytest.mark.quick
def test_every_kind_of_input_gives_the_same_prediction(trained, synthetic_root):
    seg = cityseg.load(trained, device="cpu")
    path = _val_images(synthetic_root)[1]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    expected = seg.predict(path)
    assert np.array_equal(seg.predict(rgb), expected) and np.array_equal(seg.predict(Image.open(path)), expected)
    assert np.array_equal(seg.predict(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])), expected)  # RGBA
    grey = rgb[..., 1].copy()
    assert np.array_equal(seg.predict(grey), seg.predict(np.dstack([grey] * 3)))
    odd = rgb[:37, :53]  # any size: the prediction is at the input's own size
    assert seg.predict(odd).shape == (37, 53)
    batch = seg.predict([rgb, odd, str(path)])
    assert [m.shape for m in batch] == [(64, 128), (37, 53), (64, 128)] and np.array_equal(batch[2], expected)
    probs = seg.predict_proba(path)
    assert probs.shape == (19, 64, 128) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(0), expected)
    raw = cityseg.load(trained, device="cpu", use_ema="no")
    assert raw.checkpoint["weights"] == "model" and not np.array_equal(raw.predict_proba(path), probs)


def test_bad_inputs_and_checkpoints_are_one_clear_error(trained, tmp_path):
    seg = cityseg.load(trained, device="cpu")
    cases = [
        (np.zeros((8, 8, 3), np.float32), "predict: got an array of float32; pass uint8 RGB values in 0-255 (values "
                                          "in 0-1: (x * 255).round().astype(np.uint8))."),
        (np.zeros((8, 8, 2), np.uint8), "predict: got an array of shape (8, 8, 2); pass H x W x 3 (RGB), H x W "
                                        "(grey) or H x W x 4 (RGBA)."),
        (str(tmp_path / "missing.png"), f"{tmp_path / 'missing.png'}: cannot be read (No such file or directory)."),
        (torch.zeros(3, 8, 8), "predict: got a Tensor; pass a file path, an HxWx3 uint8 RGB numpy array, a PIL "
                               "image, or a list of them."),
    ]
    for bad, message in cases:
        with pytest.raises(UserError) as e:
            seg.predict(bad)
        assert str(e.value) == message
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match=rf"{foreign}: not a cityseg checkpoint \(no 'model' entry\)"):
        cityseg.load(foreign, device="cpu")
    with pytest.raises(UserError) as e:
        cityseg.load(trained, mode="tiles")
    assert str(e.value) == "cityseg.load: mode: got 'tiles'; must be one of whole, slide"


def test_16_bit_pil_images_predict_as_their_files_do(trained, synthetic_root, tmp_path):
    seg = cityseg.load(trained, device="cpu")
    grey = np.asarray(Image.open(_val_images(synthetic_root)[0]).convert("L"))
    low = np.random.default_rng(0).integers(0, 256, grey.shape, dtype=np.uint16)
    deep = (grey.astype(np.uint16) << 8) | low  # 16 bits whose high byte is the 8-bit image
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), deep)
    expected = seg.predict_proba(grey)
    assert np.array_equal(seg.predict_proba(path), expected)  # how a 16-bit file is read: its high byte
    h, w = deep.shape
    images = [Image.open(path), Image.frombytes("I;16B", (w, h), deep.astype(">u2").tobytes()),
              Image.frombytes("I;16L", (w, h), deep.astype("<u2").tobytes()), Image.fromarray(deep.astype(np.int32))]
    assert [im.mode for im in images] == ["I;16", "I;16B", "I;16L", "I"]
    for image in images:
        assert np.array_equal(seg.predict_proba(image), expected), image.mode
        assert np.array_equal(seg.predict(image), seg.predict(path)), image.mode
    clipped = np.asarray(images[0].convert("RGB"))  # PIL's own conversion saturates at 255
    assert np.array_equal(clipped[..., 1], np.minimum(deep, 255))
    assert not np.array_equal(seg.predict_proba(clipped), expected)
    refused = [
        (Image.fromarray(np.zeros((4, 4), np.float32)), "predict: got a PIL image of mode F (32-bit floats); pass "
         "8-bit values, e.g. Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8)) for values in 0-1."),
        (Image.fromarray(np.array([[-1, 70000]], np.int32)), "predict: got a PIL image of mode I with values from -1 "
         "to 70000, outside 16 bits (0-65535); scale it to 0-255 yourself and pass a uint8 array."),
    ]
    for image, message in refused:
        with pytest.raises(UserError) as e:
            seg.predict(image)
        assert str(e.value) == message


def test_empty_images_and_a_zero_batch_size_are_one_line(trained, synthetic_root):
    seg = cityseg.load(trained, device="cpu")
    for empty, hw in ((np.zeros((0, 0, 3), np.uint8), "0x0"), (np.zeros((0, 7), np.uint8), "0x7"),
                      (np.zeros((3, 0, 4), np.uint8), "3x0"), (Image.new("RGB", (5, 0)), "0x5")):
        with pytest.raises(UserError) as e:
            seg.predict(empty)
        assert str(e.value) == f"predict: got an empty image ({hw} pixels); pass an image of at least 1x1."
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(UserError) as e:
            cityseg.load(trained, device="cpu", batch_size=bad)
        assert str(e.value) == f"cityseg.load: batch_size: got {bad!r}; must be an integer >= 1"
    paths = _val_images(synthetic_root)[:3]
    one = cityseg.load(trained, device="cpu", batch_size=np.int64(1))
    assert one.batch_size == 1 and all(np.array_equal(a, b) for a, b in zip(one.predict(paths), seg.predict(paths)))


EDITED = "it was edited, or written by another program or version."


def test_hand_edited_checkpoints_are_one_line_naming_the_file(trained, tmp_path, capsys):
    from cityseg.eval_job import load_model
    from cityseg.models import create_model
    from cityseg.onnx import main as onnx_main

    state = torch.load(trained, weights_only=True)
    config, ema = state["config"], state["ema"]["weights"]
    # the default width (64) against the saved width-8 weights: every tensor whose shape depends on the width
    shapes = [k for k, v in create_model("unet").state_dict().items()
              if v.shape != create_model("unet", width=8).state_dict()[k].shape]
    edited = tmp_path / "edited.pt"
    cases = [
        ({"config": ["unet"]}, f"its saved config is a list, not the mapping train.py writes; {EDITED}"),
        ({"config": {**config, "width": "8"}}, f"its saved config is not one train.py writes (width: got '8'; must be "
                                               f"an integer); {EDITED}"),
        ({"config": {**config, "model": 7}}, "its saved config names model 7, which this cityseg does not have (it has "
                                             "unet, unet_convnext_small, unet_convnext_tiny, unet_resnet101, "
                                             f"unet_resnet18, unet_resnet34, unet_resnet50); {EDITED}"),
        ({"config": {}}, f"not moving-average weights of the model its saved config names (unet) ({len(shapes)} of "
                         f"another shape, first: inc.0.weight (8, 3, 3, 3) instead of (64, 3, 3, 3)); {EDITED}"),
        ({"model": [1, 2], "ema": None}, f"its 'model' entry is not a dict of tensors (a list); {EDITED}"),
        ({"model": {**state["model"], "step": 6}, "ema": None},
         f"its 'model' entry is not a dict of tensors (its 'step' is of type int); {EDITED}"),
        ({"ema": {"updates": 6}}, f"its 'ema' entry holds no 'weights'; {EDITED} Pass --use-ema no (cityseg.load: "
                                  f"use_ema='no') to use its raw weights."),
        ({"ema": {"weights": {**{k: v for k, v in ema.items() if k != "head.bias"}, "extra.weight": torch.ones(1)}}},
         f"not moving-average weights of the model its saved config names (unet, width 8) (1 keys missing, first: "
         f"head.bias; 1 unexpected, first: extra.weight); {EDITED}"),
    ]
    for change, problem in cases:
        torch.save({**state, **change}, edited)
        with pytest.raises(ckpt.CheckpointError) as e:
            load_model(edited, torch.device("cpu"))
        assert str(e.value) == f"{edited}: {problem}", change
    with pytest.raises(ckpt.CheckpointError) as e:  # the last case, through the API
        cityseg.load(edited, device="cpu")
    assert str(e.value) == f"{edited}: {cases[-1][1]}"
    with pytest.raises(SystemExit) as exit_:  # and through the ONNX export, before anything is exported
        onnx_main(["--checkpoint", str(edited), "--out", str(tmp_path / "m.onnx")])
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {edited}: {cases[-1][1]}\n"
    torch.save({**state, "config": {**config, "width": "8"}}, edited)
    proc = run_script("evaluate.py", ["--checkpoint", str(edited), "--images", str(tmp_path), "--device", "cpu",
                                      "--out-dir", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and proc.stderr == f"error: {edited}: {cases[1][1]}\n", proc.stderr


def test_checkpoints_get_the_mode_the_umask_gives(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o007, 0o660)):  # a shared cluster's usual ones
        old = os.umask(umask)
        try:
            assert ckpt.umask() == umask
            ckpt.save({"iteration": 1}, tmp_path / "last.pt")
        finally:
            os.umask(old)
        assert (tmp_path / "last.pt").stat().st_mode & 0o777 == mode  # not mkstemp's 0600


@pytest.mark.quick
def test_palette_label_ids_and_classes():
    mask = np.array([[0, 1, 18, 255]], np.uint8)
    assert cityseg.to_label_ids(mask).tolist() == [[7, 8, 33, 0]]  # road, sidewalk, bicycle, unlabeled
    assert cityseg.colorize(mask)[0].tolist() == [[128, 64, 128], [244, 35, 232], [119, 11, 32], [0, 0, 0]]
    assert cityseg.CLASSES[0] == "road" and len(cityseg.CLASSES) == 19
    image = np.full((1, 4, 3), 200, np.uint8)
    assert cityseg.overlay(image, mask, alpha=0.0).tolist() == image.tolist()


@pytest.mark.quick
def test_overlay_takes_float_images_in_0_1_and_refuses_other_images_and_masks_in_one_line():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    mask = rng.integers(0, 19, (6, 9), dtype=np.uint8)
    as_read = (image / 255).astype(np.float32)  # what plt.imread gives for this image as a PNG
    assert np.array_equal(cityseg.overlay(as_read, mask, alpha=0.0), image)
    blended = cityseg.overlay(as_read, mask)
    assert blended.dtype == np.uint8 and np.array_equal(blended, cityseg.overlay(image, mask))
    rgba = np.dstack([as_read, np.ones((6, 9), np.float32)])  # an RGBA PNG through plt.imread
    assert np.array_equal(cityseg.overlay(rgba, mask), blended)
    cases = [
        (image.astype(np.float64), mask, f"overlay: got a float64 image with values from {image.min()} to "
         f"{image.max()}; pass floats in [0, 1] (as plt.imread gives) or uint8 RGB (for 0-255: "
         f"x.round().astype(np.uint8))."),
        (image.astype(np.uint16), mask, "overlay: got an image of uint16; pass uint8 RGB (0-255) or floats in [0, 1]."),
        (image, mask[:5, :8], "overlay: the image is 6x9 but the mask is 5x8; pass the mask predicted for this image "
         "(predict gives it at the image's size)."),
        (image, mask[None], "overlay: the image is 6x9 but the mask is of shape (1, 6, 9); pass the mask predicted "
         "for this image (predict gives it at the image's size)."),
    ]
    for bad_image, bad_mask, message in cases:
        with pytest.raises(ValueError) as e:
            cityseg.overlay(bad_image, bad_mask)
        assert str(e.value) == message


# -- ONNX -------------------------------------------------------------------------------------------------------
def _needs_onnx():
    pytest.importorskip("onnxruntime")
    from cityseg.onnx import ONNX_TORCH, torch_version

    if torch_version() < ONNX_TORCH:
        pytest.skip(f"the ONNX export needs torch {ONNX_TORCH[0]}.{ONNX_TORCH[1]} or newer")


def _onnx_check(path: Path, model: torch.nn.Module) -> None:
    """onnxruntime against PyTorch at two sizes (one not a multiple of 16), batches of 1 and 3."""
    import onnxruntime as ort

    from cityseg.onnx import ImageToLogits

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(uint8)")]
    for shape in ((1, 3, 64, 128), (3, 3, 50, 70)):
        images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
        logits = session.run(["logits"], {"image": images})[0]
        with torch.no_grad():
            expected = ImageToLogits(model).eval()(torch.from_numpy(images)).numpy()
        assert logits.dtype == np.float32 and logits.shape == (shape[0], 19, *shape[2:])
        assert np.abs(logits - expected).max() < 1e-4 * max(1.0, float(np.abs(expected).max()))
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_onnx_export_of_a_checkpoint_runs_in_onnxruntime_at_any_size(trained, tmp_path, capsys):
    _needs_onnx()
    from cityseg.eval_job import load_model

    from cityseg.onnx import main

    out = tmp_path / "unet.onnx"
    old = os.umask(0o022)  # a shared cluster's usual umask: the group and serving accounts may read new files
    try:
        status = main(["--checkpoint", str(trained), "--out", str(out)])  # python -m cityseg.onnx's (Ctrl-C: below)
    finally:
        os.umask(old)
    stdout = capsys.readouterr().out
    assert status == 0 and out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert "onnxruntime against PyTorch on a 1x3x250x500 image" in stdout
    assert "argmax agreement 100.000%" in stdout or "argmax agreement 99.9" in stdout, stdout
    model, _ = load_model(trained, torch.device("cpu"))  # the EMA weights, as the export took them
    _onnx_check(out, model)


def _fake_export(exported: list) -> object:
    """torch.onnx.export that writes a few bytes at once, for the tests of what happens around the export."""
    def export(*args, **kwargs):
        exported.append(args)
        return SimpleNamespace(save=lambda path: Path(path).write_bytes(b"exported"))
    return export


@pytest.mark.quick
def test_onnx_writes_its_file_only_once_the_check_passed(trained, tmp_path, monkeypatch, capsys):
    _needs_onnx()
    import cityseg.onnx as onnx_cli

    monkeypatch.setattr(torch.onnx, "export", _fake_export([]))
    out, fresh = tmp_path / "model.onnx", tmp_path / "new.onnx"
    out.write_bytes(b"previous")

    def raises(*args):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH\nmore")
    for check, failure in (((lambda *args: (0.5, 0.98)), "argmax agreement 98.000% is below 99.9%"),
                           (raises, "the check raised RuntimeError: [ONNXRuntimeError] : 10 : INVALID_GRAPH")):
        monkeypatch.setattr(onnx_cli, "check", check)
        for path, kept in ((out, "the file already there is unchanged"), (fresh, "nothing was written")):
            assert onnx_cli.main(["--checkpoint", str(trained), "--out", str(path), "--check-size", "64x64"]) == 1
            assert capsys.readouterr().err == f"error: --out {path}: the export failed its check ({failure}); {kept}.\n"
            assert sorted(tmp_path.iterdir()) == [out] and out.read_bytes() == b"previous"  # no temp file left
    monkeypatch.setattr(onnx_cli, "check", lambda *args: (1e-6, 1.0))
    old = os.umask(0o027)
    try:
        assert onnx_cli.main(["--checkpoint", str(trained), "--out", str(out), "--check-size", "64x64"]) == 0
    finally:
        os.umask(old)
    assert sorted(tmp_path.iterdir()) == [out] and out.read_bytes() == b"exported"
    assert out.stat().st_mode & 0o777 == 0o640


def test_onnx_refuses_a_directory_out_and_a_check_too_big_for_memory_before_exporting(trained, tmp_path,
                                                                                       monkeypatch, capsys):
    _needs_onnx()
    from cityseg.onnx import main as onnx_main

    exported: list = []
    monkeypatch.setattr(torch.onnx, "export", _fake_export(exported))
    cases = [(["--out", str(tmp_path)], f"error: --out {tmp_path}: is a directory; pass the path of the .onnx file "
                                        f"to write, e.g. {tmp_path / 'model.onnx'}.\n"),
             # 1e10 pixels at 2215 bytes each (the image, its floats, two runs' logits and activations): 20.1 TiB
             (["--out", str(tmp_path / "m.onnx"), "--check-size", "100000x100000"],
              r"error: --check-size 100000x100000: the onnxruntime check at that size needs about 20\.1 TiB of memory "
              r"and this machine has [\d.]+ [GT]iB available; pass a smaller --check-size \(the default is 250x500\)\."
              "\n")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            onnx_main(["--checkpoint", str(trained), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and (err == message or re.fullmatch(message, err)), err
    assert exported == [] and list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _ctrl_c_reaches_children():
    """A child inherits an ignored SIGINT (a test run started in the background has one) but not a handled one,
    which exec resets: the child's Python then installs its own handler, as under a terminal's Ctrl-C."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_of_the_onnx_export_is_one_line_and_keeps_the_previous_file(trained, tmp_path):
    _needs_onnx()
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    cmd = [sys.executable, "-m", "cityseg.onnx", "--checkpoint", str(trained), "--out", str(out)]
    for when in ("importing", "exporting"):
        with _ctrl_c_reaches_children():
            proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if when == "importing":  # torch alone takes seconds to import
            time.sleep(1)
        else:  # the temp file beside --out: the export is under way
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob(".model.onnx.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert (proc.returncode, err) == (130, "python -m cityseg.onnx: interrupted (Ctrl-C).\n"), (when, err[-3000:])
        assert sorted(tmp_path.iterdir()) == [out] and out.read_bytes() == b"previous export", when


def test_onnx_export_of_an_encoder_model(tmp_path):
    _needs_onnx()
    from cityseg.models import create_model
    from cityseg.onnx import export

    torch.manual_seed(0)
    model = create_model("unet_resnet18", decoder_channels="32,16,16,8,8").eval()
    _onnx_check(export(model, tmp_path / "r18.onnx"), model)


# -- the notebook -----------------------------------------------------------------------------------------------
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    sys.path.insert(0, str(REPO / "scripts"))
    from run_notebook import execute

    monkeypatch.setenv("QUICKSTART_ITERS", "12")  # the committed copy ran the full minute
    nb = execute(REPO / "notebooks" / "quickstart.ipynb", timeout=600, workdir=tmp_path)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "done: 12 iterations" in text and "val: mIoU" in text and "mIoU" in text
    pictures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) == 3  # the panels, the IoU bars with the confusion matrix, the overlay
    assert (tmp_path / "quickstart" / "run" / "best.pt").is_file()


def test_the_committed_notebook_holds_the_outputs_of_a_real_execution():
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)  # every cell was run, in order
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    text = "".join(o.get("text", "") for c in code for o in c.get("outputs", []))
    assert "done: 150 iterations" in text
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])) == 3
