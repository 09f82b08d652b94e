"""Full-resolution inference: whole image or sliding window, with flip and multi-scale test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class InferenceMode:
    """How logits of a full image are computed."""

    mode: str = "whole"                       # "whole" or "slide"
    window: tuple[int, int] = (512, 1024)      # slide: window size (H, W)
    stride: tuple[int, int] = (341, 683)       # slide: step between windows (H, W)
    flip: bool = False                         # average with the horizontally flipped image
    scales: tuple[float, ...] = (1.0,)         # average over these rescalings of the image

    @property
    def augmented(self) -> bool:
        """True when several predictions are averaged (TTA)."""
        return self.flip or len(self.scales) > 1


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` covering ``[0, size)`` every ``stride``, the last flush with
    the end (a single window when the image is not larger than it)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def slide_logits(model: nn.Module, x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int],
                 num_classes: int) -> torch.Tensor:
    """Logits of ``x`` from overlapping windows; where windows overlap their logits are averaged."""
    n, _, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    total = x.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
    for top in window_starts(h, wh, stride[0]):
        for left in window_starts(w, ww, stride[1]):
            crop = x[:, :, top:top + wh, left:left + ww]
            total[:, :, top:top + wh, left:left + ww] += model(crop).float()
            count[:, :, top:top + wh, left:left + ww] += 1
    return total / count


def _logits(model: nn.Module, x: torch.Tensor, mode: InferenceMode, num_classes: int) -> torch.Tensor:
    if mode.mode == "slide":
        return slide_logits(model, x, mode.window, mode.stride, num_classes)
    return model(x).float()


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` resized by ``scale`` (bilinear), at least one pixel on each side (a tiny image at scale 0.5)."""
    h, w = x.shape[-2:]
    if int(h * scale) >= 1 and int(w * scale) >= 1:
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="bilinear",
                         align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mode: InferenceMode, num_classes: int) -> torch.Tensor:
    """Scores (N, C, H, W) at the input's size: logits, or with TTA the mean of the variants' softmax."""
    if not mode.augmented:
        return _logits(model, x, mode, num_classes)
    h, w = x.shape[-2:]
    total = None
    for scale in mode.scales:
        xs = x if scale == 1.0 else rescale(x, scale)
        for flip in ((False, True) if mode.flip else (False,)):
            out = _logits(model, xs.flip(-1) if flip else xs, mode, num_classes)
            out = out.flip(-1) if flip else out
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            prob = out.softmax(dim=1)
            total = prob if total is None else total + prob
    return total / (len(mode.scales) * (2 if mode.flip else 1))
