"""Pictures of predictions: image | ground truth | prediction | errors panels, IoU bars, confusion heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, colorize

ERROR_RGB = (255, 0, 0)


def error_map(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB: red where the prediction is wrong, grey where right, black where the ground truth is ignored."""
    out = np.full(gt.shape + (3,), 96, np.uint8)
    out[(pred != gt) & (gt != IGNORE_INDEX)] = ERROR_RGB
    out[gt == IGNORE_INDEX] = 0
    return out


def overlay(image: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with its prediction (H x W trainIds) in the Cityscapes palette, as uint8 RGB. The image
    is RGB (or grey, or RGBA: the alpha is dropped), uint8 or floats in [0, 1] (what ``plt.imread`` gives)."""
    rgb = _uint8_rgb(np.asarray(image))
    pred = np.asarray(pred)
    if pred.dtype.kind not in "ui":
        raise ValueError(f"overlay: got a mask of {pred.dtype}; pass the trainIds predict gives (H x W uint8).")
    if pred.shape != rgb.shape[:2]:
        got = f"{pred.shape[0]}x{pred.shape[1]}" if pred.ndim == 2 else f"of shape {pred.shape}"
        raise ValueError(f"overlay: the image is {rgb.shape[0]}x{rgb.shape[1]} but the mask is {got}; pass the "
                         f"mask predicted for this image (predict gives it at the image's size).")
    return cv2.addWeighted(rgb, 1 - alpha, colorize(pred), alpha, 0)


def _uint8_rgb(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 from an RGB, grey or RGBA image of uint8 or of floats in [0, 1]; anything else is refused."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"overlay: got an image of shape {image.shape}; pass H x W x 3 (RGB), H x W (grey) or "
                         f"H x W x 4 (RGBA).")
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind != "f":
        raise ValueError(f"overlay: got an image of {image.dtype}; pass uint8 RGB (0-255) or floats in [0, 1].")
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if not 0 <= low <= high <= 1:  # also NaN
        raise ValueError(f"overlay: got a {image.dtype} image with values from {low:g} to {high:g}; pass floats in "
                         f"[0, 1] (as plt.imread gives) or uint8 RGB (for 0-255: x.round().astype(np.uint8)).")
    return (image.astype(np.float64) * 255).round().astype(np.uint8)


def _titled(rgb: np.ndarray, title: str) -> np.ndarray:
    bar_h = max(18, rgb.shape[0] // 16)
    bar = np.full((bar_h, rgb.shape[1], 3), 255, np.uint8)
    scale = bar_h / 30
    cv2.putText(bar, title, (4, int(bar_h * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                max(1, int(round(scale * 1.5))), cv2.LINE_AA)
    return np.concatenate([bar, rgb], axis=0)


def panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """A 2x2 RGB panel: image, ground truth, prediction (Cityscapes palette) and errors."""
    tiles = [_titled(image, "image"), _titled(colorize(gt), "ground truth"),
             _titled(colorize(pred), "prediction"), _titled(error_map(gt, pred), "errors (red)")]
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB array as PNG (encoded in memory, so a failed write is an OSError, not libpng's noise)."""
    write_png(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a BGR or single-channel uint8 array as PNG; a failed write raises OSError naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"{path}: could not encode the image as PNG")
    try:
        path.write_bytes(data.tobytes())
    except OSError as e:
        raise OSError(f"{path}: could not write ({e.strerror or e})") from None


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure on its own Agg canvas: pyplot's state and backend (a notebook's) are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _figure_rgb(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def iou_bars(result: dict[str, Any]) -> np.ndarray:
    """Horizontal bar chart of per-class IoU (classes without ground truth or prediction are marked n/a)."""
    names = list(result["iou"])
    values = [v if v is not None else 0.0 for v in result["iou"].values()]
    colors = [tuple(c / 255 for c in rgb) for rgb in colorize(np.arange(NUM_CLASSES, dtype=np.uint8)[None])[0]]
    fig = _figure(6, 6)
    ax = fig.subplots()
    ax.barh(range(len(names)), [100 * v for v in values], color=colors, edgecolor="black", linewidth=0.5)
    ax.set_yticks(range(len(names)), [n if result["iou"][n] is not None else f"{n} (n/a)" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    miou = result["miou"]
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"per-class IoU, mIoU {100 * miou:.2f}%" if miou is not None else "per-class IoU")
    fig.tight_layout()
    return _figure_rgb(fig)


def confusion_heatmap(mat: np.ndarray, names: tuple[str, ...] = CLASS_NAMES) -> np.ndarray:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) with class names."""
    rows = mat.sum(axis=1, keepdims=True).astype(np.float64)
    norm = np.divide(mat, rows, out=np.zeros_like(mat, dtype=np.float64), where=rows > 0)
    fig = _figure(8, 7)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _figure_rgb(fig)
