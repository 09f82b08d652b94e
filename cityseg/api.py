"""Use a trained model from Python: ``cityseg.load(checkpoint).predict(image)``.

    import cityseg
    seg = cityseg.load("runs/unet/best.pt")                 # GPU if there is one; the EMA weights if saved
    mask = seg.predict("photo.jpg")                          # H x W uint8 trainIds (0-18)
    cityseg.overlay(image, mask)                             # or cityseg.colorize(mask), cityseg.to_label_ids(mask)

The prediction is evaluate.py's: the same checkpoint loading, inference modes (whole image, sliding windows,
flip and multi-scale TTA) and code, so ``to_label_ids(predict(path))`` equals the PNG that
``evaluate.py --export-dir`` writes for that image, pixel for pixel.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import ConfigError, EvalConfig
from .data import read_image
from .errors import UserError
from .evaluation import Predictor
from .inference import InferenceMode
from .precision import amp_dtype

#: What ``predict`` takes: a file path, an HxWx3 uint8 RGB array, a PIL image, or a list of them.
ImageLike = Any


class InputError(UserError):
    """An image given to ``predict`` that cityseg cannot use as it is; the message says what to pass."""


class Segmenter:
    """A trained model with the way to run it (``cityseg.load``); ``predict`` and ``predict_proba``."""

    def __init__(self, predictor: Predictor, checkpoint: dict[str, Any], batch_size: int = 8):
        self.predictor = predictor
        self.checkpoint = checkpoint  # iteration, config, and which weights: "ema" or "model"
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.predictor.device

    def predict(self, x: ImageLike | Sequence[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """trainIds (H x W uint8, 0-18) at each image's own size; a list for a list."""
        return self._run(x, lambda batch: self.predictor(batch).to(torch.uint8).cpu().numpy())

    def predict_proba(self, x: ImageLike | Sequence[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """Class probabilities (19 x H x W float32, the softmax; with TTA the mean of the variants'); a list for a
        list."""
        def probabilities(batch: torch.Tensor) -> np.ndarray:
            scores = self.predictor.scores(batch).float()
            probs = scores if self.predictor.mode.augmented else scores.softmax(dim=1)
            return probs.cpu().numpy()
        return self._run(x, probabilities)

    def _run(self, x: ImageLike | Sequence[ImageLike], fn: Any) -> np.ndarray | list[np.ndarray]:
        single = not isinstance(x, (list, tuple))
        images = [as_rgb(item) for item in ([x] if single else x)]
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):  # images of one size go through the model together
            by_size.setdefault(image.shape[:2], []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = torch.from_numpy(np.stack([images[i] for i in chunk]))
                for i, result in zip(chunk, fn(batch)):
                    out[i] = result
        return out[0] if single else out  # type: ignore[return-value]


def as_rgb(item: ImageLike) -> np.ndarray:
    """An HxWx3 uint8 RGB array from a path, a PIL image or an array (grey or RGBA arrays converted)."""
    rgb = _to_rgb(item)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:  # the model's convolutions would fail on it
        raise InputError(f"predict: got an empty image ({rgb.shape[0]}x{rgb.shape[1]} pixels); pass an image of at "
                         f"least 1x1.")
    return rgb


def _to_rgb(item: ImageLike) -> np.ndarray:
    if isinstance(item, (str, Path)):
        return read_image(Path(item).expanduser())
    if type(item).__module__.startswith("PIL."):
        return _pil_rgb(item)
    if not isinstance(item, np.ndarray):
        raise InputError(f"predict: got a {type(item).__name__}; pass a file path, an HxWx3 uint8 RGB numpy array, "
                         f"a PIL image, or a list of them.")
    if item.dtype != np.uint8:
        hint = (" (values in 0-1: (x * 255).round().astype(np.uint8))" if item.dtype.kind == "f" else
                " (16-bit values: (x >> 8).astype(np.uint8), as 16-bit files are read)" if item.dtype == np.uint16
                else "")
        raise InputError(f"predict: got an array of {item.dtype}; pass uint8 RGB values in 0-255{hint}.")
    if item.ndim == 2 or (item.ndim == 3 and item.shape[2] == 1):  # grey: the same value in R, G and B
        return np.ascontiguousarray(np.repeat(item.reshape(*item.shape[:2], 1), 3, axis=2))
    if item.ndim == 3 and item.shape[2] == 4:  # RGBA: the alpha channel is dropped
        return np.ascontiguousarray(item[..., :3])
    if item.ndim != 3 or item.shape[2] != 3:
        raise InputError(f"predict: got an array of shape {item.shape}; pass H x W x 3 (RGB), H x W (grey) or "
                         f"H x W x 4 (RGBA).")
    return np.ascontiguousarray(item)


def _pil_rgb(image: Any) -> np.ndarray:
    """A PIL image as uint8 RGB; 16-bit grey (modes I;16*, and I within 0-65535) keeps its high byte, as the
    path reader (OpenCV) decodes a 16-bit PNG or TIFF, where ``convert("RGB")`` would clip it to 0 or 255."""
    if image.mode == "F":
        raise InputError("predict: got a PIL image of mode F (32-bit floats); pass 8-bit values, e.g. "
                         "Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8)) for values in 0-1.")
    if not image.mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N, I;16S
        return np.asarray(image.convert("RGB"))
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(f"predict: got a PIL image of mode {image.mode} with values from {values.min()} to "
                         f"{values.max()}, outside 16 bits (0-65535); scale it to 0-255 yourself and pass a uint8 "
                         f"array.")
    return _to_rgb((values.astype(np.uint16) >> 8).astype(np.uint8))


def load(checkpoint: str | Path, device: str = "auto", mode: str = "whole", window: str = "512x1024",
         stride: str = "341x683", tta: str | None = None, scales: Sequence[float] | str = (1.0,), amp: str = "auto",
         use_ema: str = "auto", batch_size: int = 8) -> Segmenter:
    """A :class:`Segmenter` for a checkpoint written by train.py. ``device``: auto (a GPU if there is one), cuda
    or cpu; ``mode``, ``window``, ``stride``, ``tta`` (None or "flip"), ``scales``, ``amp`` and ``use_ema`` mean
    what evaluate.py's flags of those names mean. The auxiliary head of training is dropped."""
    from .distributed import resolve_device
    from .eval_job import load_model

    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"cityseg.load: batch_size: got {batch_size!r}; must be an integer >= 1")
    if not isinstance(scales, str):
        try:
            scales = ",".join(str(float(s)) for s in (scales if isinstance(scales, (list, tuple)) else list(scales)))
        except (TypeError, ValueError):
            scales = repr(scales)  # refused below, as evaluate.py refuses it
    try:  # checked by evaluate.py's own config, so each option means and accepts what its flag does
        cfg = EvalConfig(checkpoint=str(checkpoint), images="-", device=str(device), mode=mode, window=window,
                         stride=stride, tta=tta or "none", scales=scales, amp=amp, use_ema=use_ema)
    except ConfigError as e:
        raise InputError(f"cityseg.load: {str(e).removeprefix('--')}") from None
    dev = resolve_device(cfg.device, 0)
    model, state = load_model(Path(cfg.checkpoint).expanduser(), dev, cfg.use_ema)
    inference = InferenceMode(cfg.mode, cfg.window_hw, cfg.stride_hw, cfg.tta == "flip", cfg.scale_list())
    predictor = Predictor(model, dev, amp_dtype(cfg.amp, dev), True, inference)
    info = {"iteration": state.get("iteration"), "config": state.get("config"), "weights": state["evaluated"]}
    return Segmenter(predictor, info, int(batch_size))
