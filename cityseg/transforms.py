"""Augmentation seeded by (seed, epoch, index), crop before resize, and on-device normalisation.

The training augmentation is random scale (0.5-2.0), pad (label 255), random crop, horizontal flip and mild
photometric jitter. It is computed crop-first: the scale and the window are drawn before any pixel is
touched, and one OpenCV affine warp reads only the source pixels under the window and writes the crop
directly, so a 2x scale never builds a 4096x2048 image. The photometric jitter (albumentations) then runs
on the crop alone.
"""

from __future__ import annotations

import functools

import albumentations as A
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

    Only the source rows and columns under the window are read and resized (one ``cv2.resize`` of a view);
    the window's grid may sit up to half a scaled pixel from that of a whole-image resize, the same for image
    and label. Pixels of the window beyond the scaled image are ``fill`` (pad-then-crop's bottom/right).
    """
    h, w = src.shape[:2]
    oh, ow = out_hw
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    iy, ix = h / sh, w / sw  # the exact factors of resizing to the rounded size (sh, sw)
    bottom, right = min(top + oh, sh), min(left + ow, sw)  # the part of the window inside the scaled image
    y0, x0 = int(top * iy), int(left * ix)
    y1, x1 = min(h, int(np.ceil(bottom * iy))), min(w, int(np.ceil(right * ix)))
    rh, rw = max(1, round((y1 - y0) / iy)), max(1, round((x1 - x0) / ix))
    resized = cv2.resize(src[y0:y1, x0:x1], (rw, rh), interpolation=interpolation)
    oy, ox = min(max(round(top - y0 / iy), 0), rh - 1), min(max(round(left - x0 / ix), 0), rw - 1)
    part = resized[oy:oy + bottom - top, ox:ox + right - left]
    if part.shape[:2] == (oh, ow):
        return part
    out = np.full((oh, ow) + src.shape[2:], fill, dtype=src.dtype)
    out[:part.shape[0], :part.shape[1]] = part
    return out


class TrainTransform:
    """Random scale, pad (label 255), random crop, horizontal flip and mild photometric jitter."""

    def __init__(self, crop_hw: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0):
        self.crop_hw, self.scale_range, self.seed = crop_hw, scale_range, seed
        self.photometric = A.Compose([A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)])

    def params(self, hw: tuple[int, int], epoch: int, index: int) -> tuple[float, int, int, bool, int]:
        """(scale, top, left, flip, photometric seed) of a sample; a function of (seed, epoch, index)."""
        s = sample_seed(self.seed, epoch, index)
        rng = np.random.default_rng(s)
        scale = float(rng.uniform(*self.scale_range))
        sh, sw = max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))
        top = int(rng.integers(0, max(sh - self.crop_hw[0], 0) + 1))
        left = int(rng.integers(0, max(sw - self.crop_hw[1], 0) + 1))
        return scale, top, left, bool(rng.random() < 0.5), s

    def __call__(self, image: np.ndarray, label: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        scale, top, left, flip, s = self.params(image.shape[:2], epoch, index)
        img = scaled_crop(image, scale, top, left, self.crop_hw, cv2.INTER_LINEAR, 0)
        lab = scaled_crop(label, scale, top, left, self.crop_hw, cv2.INTER_NEAREST_EXACT, IGNORE_INDEX)
        if flip:
            img, lab = cv2.flip(img, 1), cv2.flip(lab, 1)
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
