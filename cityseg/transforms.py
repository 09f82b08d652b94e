"""Augmentation seeded by (seed, epoch, index), crop before resize, and on-device normalisation.

The training augmentation is random scale (0.5-2.0), pad (label 255), random crop (optionally retried until
no class dominates it, ``--cat-max-ratio``), horizontal flip and photometric distortion (``--photometric``).
It is computed crop-first: the scale and the window are drawn before any pixel is touched, and one OpenCV
affine warp reads only the source pixels under the window and writes the crop directly, so a 2x scale never
builds a 4096x2048 image. The photometric distortion (albumentations) then runs on the crop alone.
"""

from __future__ import annotations

import functools
import os

# albumentations asks PyPI for a newer version at import (up to 2 s, and a warning in every task's log on compute
# nodes without internet); a user who wants the check sets the variable to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch

from .labels import IGNORE_INDEX

# ImageNet statistics, in 0-255 units, applied on the device.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index): not on rank, worker or history."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def scaled_crop(src: np.ndarray, scale: float, top: int, left: int, out_hw: tuple[int, int],
                interpolation: int, fill: int) -> np.ndarray:
    """The ``out_hw`` window at (top, left) of ``src`` resized by ``scale``, without resizing the rest.

    Crop pixel (i, j) is pixel (top + i, left + j) of ``src`` resized to ``sh x sw = round(h * scale) x
    round(w * scale)``, whose centre lies at source ``((left + j + 0.5) * w / sw - 0.5, (top + i + 0.5) * h / sh
    - 0.5)``, as ``cv2.resize`` maps it. Only those points are sampled, so only the source pixels under the
    window are read: for images (``cv2.INTER_LINEAR``) by one affine warp of the source window, for labels
    (``cv2.INTER_NEAREST``) by taking source pixel ``floor((left + j + 0.5) * w / sw)``, in exact integer
    arithmetic. Pixels of the window beyond the scaled image are ``fill`` (pad-then-crop's bottom/right).
    """
    h, w = src.shape[:2]
    oh, ow = out_hw
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    if interpolation == cv2.INTER_NEAREST:
        rows = np.minimum((2 * np.arange(top, top + oh) + 1) * h // (2 * sh), h - 1)
        cols = np.minimum((2 * np.arange(left, left + ow) + 1) * w // (2 * sw), w - 1)
        out = np.take(np.take(src, rows, axis=0), cols, axis=1)
    else:
        out = _warp_window(src, (h / sh, w / sw), (top, left), out_hw, interpolation)
    out[max(0, sh - top):] = fill
    out[:, max(0, sw - left):] = fill
    return out


def _warp_window(src: np.ndarray, step: tuple[float, float], origin: tuple[int, int], out_hw: tuple[int, int],
                 interpolation: int) -> np.ndarray:
    """Sample ``src`` at ``(origin + k + 0.5) * step - 0.5`` for the ``out_hw`` grid, reading only the source
    rows and columns those points need (clamped at the image's border, as resize does)."""
    (iy, ix), (top, left), (oh, ow) = step, origin, out_hw
    h, w = src.shape[:2]
    y0, x0 = max(0, int((top + 0.5) * iy - 0.5)), max(0, int((left + 0.5) * ix - 0.5))
    y1, x1 = min(h, int((top + oh - 0.5) * iy - 0.5) + 2), min(w, int((left + ow - 0.5) * ix - 0.5) + 2)
    window = src[min(y0, h - 1):max(y1, y0 + 1), min(x0, w - 1):max(x1, x0 + 1)]
    to_window = np.array([[ix, 0.0, (left + 0.5) * ix - 0.5 - min(x0, w - 1)],
                          [0.0, iy, (top + 0.5) * iy - 0.5 - min(y0, h - 1)]])
    flags = interpolation | cv2.WARP_INVERSE_MAP
    if src.ndim == 3 and src.shape[2] == 3:  # OpenCV's 4-channel warp is about 2.5x as fast as its 3-channel one
        window = cv2.cvtColor(window, cv2.COLOR_RGB2RGBA)
        warped = cv2.warpAffine(window, to_window, (ow, oh), flags=flags, borderMode=cv2.BORDER_REPLICATE)
        return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)
    return cv2.warpAffine(window, to_window, (ow, oh), flags=flags, borderMode=cv2.BORDER_REPLICATE)


#: Crop windows tried per sample with ``--cat-max-ratio`` below 1 (mmsegmentation's RandomCrop tries 10).
CROP_TRIES = 10


def photometric(kind: str) -> A.Compose | None:
    """The photometric distortion of ``--photometric``, or None for ``none``.

    ``full`` has mmsegmentation's PhotoMetricDistortion ranges and structure: brightness +-32, then contrast
    x0.5-1.5 either before or after saturation x0.5-1.5 and hue +-18 (OpenCV's 180-step hue), each applied with
    probability 1/2. Saturation is albumentations' (a blend with the grey image, torchvision's definition),
    where mmsegmentation scales the HSV saturation channel.
    """
    if kind == "none":
        return None
    if kind == "mild":
        return A.Compose([A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)])
    brightness = A.RandomBrightnessContrast(brightness_limit=(-32 / 255, 32 / 255), contrast_limit=(0, 0),
                                            brightness_by_max=True, p=0.5)
    contrast = A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(-0.5, 0.5), p=0.5)
    saturation = A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(0.5, 1.5), hue=(0, 0), p=0.5)
    hue = A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=0, val_shift_limit=0, p=0.5)
    return A.Compose([brightness, A.OneOf([A.Sequential([contrast, saturation, hue]),
                                           A.Sequential([saturation, hue, contrast])], p=1.0)])


def class_share_ok(label: np.ndarray, max_ratio: float) -> bool:
    """No class covers more than ``max_ratio`` of the labelled (not ignored) pixels of ``label``."""
    counts = np.bincount(label.reshape(-1), minlength=256)[:IGNORE_INDEX]
    total = counts.sum()
    return bool(total > 0 and counts.max() <= max_ratio * total)


class TrainTransform:
    """Random scale, pad (label 255), random crop, horizontal flip and photometric distortion."""

    def __init__(self, crop_hw: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
                 cat_max_ratio: float = 1.0, photometric_kind: str = "mild"):
        self.crop_hw, self.scale_range, self.seed = crop_hw, scale_range, seed
        self.cat_max_ratio = cat_max_ratio
        self.photometric = photometric(photometric_kind)

    def params(self, hw: tuple[int, int], epoch: int, index: int) -> tuple[float, list[tuple[int, int]], bool, int]:
        """(scale, crop windows to try, flip, photometric seed) of a sample; a function of (seed, epoch, index).

        One window (top, left) unless ``cat_max_ratio`` < 1; then ``CROP_TRIES``, the first as without it."""
        s = sample_seed(self.seed, epoch, index)
        rng = np.random.default_rng(s)
        scale = float(rng.uniform(*self.scale_range))
        sh, sw = max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))

        def window() -> tuple[int, int]:
            return (int(rng.integers(0, max(sh - self.crop_hw[0], 0) + 1)),
                    int(rng.integers(0, max(sw - self.crop_hw[1], 0) + 1)))

        windows = [window()]
        flip = bool(rng.random() < 0.5)
        if self.cat_max_ratio < 1:
            windows += [window() for _ in range(CROP_TRIES - 1)]
        return scale, windows, flip, s

    def __call__(self, image: np.ndarray, label: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        scale, windows, flip, s = self.params(image.shape[:2], epoch, index)
        for top, left in windows:  # the first window whose classes are balanced enough, else the last
            lab = scaled_crop(label, scale, top, left, self.crop_hw, cv2.INTER_NEAREST, IGNORE_INDEX)
            if len(windows) == 1 or class_share_ok(lab, self.cat_max_ratio):
                break
        img = scaled_crop(image, scale, top, left, self.crop_hw, cv2.INTER_LINEAR, 0)
        if flip:
            img, lab = cv2.flip(img, 1), cv2.flip(lab, 1)
        if self.photometric is None:
            return img, lab
        self.photometric.set_random_seed(s)
        return self.photometric(image=img)["image"], lab


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: building them every step would be a blocking host-to-device copy
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1))


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW on ``device`` (the conversion happens there, not on the CPU)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean, std = _mean_std(torch.device(device))
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_target(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 trainId labels -> int64 targets on ``device``."""
    return labels.to(device, non_blocking=True).long()
