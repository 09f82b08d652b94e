"""Using a trained model: ``cityseg.load(...).predict(...)`` against evaluate.py's exports, its inputs and errors,
the ONNX export under onnxruntime, and the quickstart notebook executed top to bottom."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import cityseg
from cityseg import checkpoint as ckpt
from cityseg.errors import UserError
from conftest import REPO, TINY, run_script


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> Path:
    """A small U-Net with an auxiliary head and a moving average of its weights, trained 6 iterations."""
    out = tmp_path_factory.mktemp("api_run")
    run_script("train.py", ["--data-root", str(synthetic_root), "--out-dir", str(out), *TINY, "--max-iters", "6",
                            "--batch-size", "2", "--lr", "0.05", "--eval-every", "0", "--num-pictures", "0",
                            "--aux-weight", "0.4", "--ema-decay", "0.5"])
    return out / "last.pt"


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


def test_palette_label_ids_and_classes():
    mask = np.array([[0, 1, 18, 255]], np.uint8)
    assert cityseg.to_label_ids(mask).tolist() == [[7, 8, 33, 0]]  # road, sidewalk, bicycle, unlabeled
    assert cityseg.colorize(mask)[0].tolist() == [[128, 64, 128], [244, 35, 232], [119, 11, 32], [0, 0, 0]]
    assert cityseg.CLASSES[0] == "road" and len(cityseg.CLASSES) == 19
    image = np.full((1, 4, 3), 200, np.uint8)
    assert cityseg.overlay(image, mask, alpha=0.0).tolist() == image.tolist()


# -- ONNX -------------------------------------------------------------------------------------------------------
def _needs_onnx():
    pytest.importorskip("onnxruntime")
    from cityseg.onnx import torch_version

    if torch_version() < (2, 6):
        pytest.skip("the ONNX export needs torch 2.6 or newer (torch.onnx.export(dynamo=True))")


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


def test_onnx_export_of_a_checkpoint_runs_in_onnxruntime_at_any_size(trained, tmp_path):
    _needs_onnx()
    from cityseg.eval_job import load_model

    out = tmp_path / "unet.onnx"
    proc = subprocess.run([sys.executable, "-m", "cityseg.onnx", "--checkpoint", str(trained), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "onnxruntime against PyTorch on a 1x3x250x500 image" in proc.stdout
    assert "argmax agreement 100.000%" in proc.stdout or "argmax agreement 99.9" in proc.stdout, proc.stdout
    model, _ = load_model(trained, torch.device("cpu"))  # the EMA weights, as the export took them
    _onnx_check(out, model)


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
