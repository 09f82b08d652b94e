"""Augmentation (albumentations + OpenCV) seeded by (seed, epoch, index), and on-device normalisation."""

from __future__ import annotations

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


class TrainTransform:
    """Random scale, pad (label 255), random crop, horizontal flip and mild photometric jitter."""

    def __init__(self, crop_hw: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0):
        h, w = crop_hw
        self.seed = seed
        self.aug = A.Compose([
            A.RandomScale(scale_limit=(scale_range[0] - 1.0, scale_range[1] - 1.0), p=1.0,
                          interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
            A.PadIfNeeded(min_height=h, min_width=w, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=IGNORE_INDEX),
            A.RandomCrop(height=h, width=w),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.5),
        ])

    def __call__(self, image: np.ndarray, label: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        self.aug.set_random_seed(sample_seed(self.seed, epoch, index))
        out = self.aug(image=image, mask=label)
        return out["image"], out["mask"]


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW on ``device`` (the conversion happens there, not on the CPU)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_target(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 trainId labels -> int64 targets on ``device``."""
    return labels.to(device, non_blocking=True).long()
