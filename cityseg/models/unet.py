"""The classic U-Net (Ronneberger et al., 2015) with BatchNorm, trained from scratch: model ``unet``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..labels import NUM_CLASSES
from .common import pad_to_multiple
from .registry import register_model


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then DoubleConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout))


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip connection, then DoubleConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Four-level U-Net; ``width`` is the channel count of the first level (64 = the classic 31M net).

    With ``aux`` it also has an auxiliary head for training: a 1x1 classifier on the decoder's half-resolution
    stage (``2 * width`` channels), whose logits ``forward(x, aux=True)`` returns beside the main ones at that
    stage's resolution (``aux_stride``), covering the input's ``ceil(H / 2) x ceil(W / 2)``.
    """

    multiple = 16  # four 2x poolings
    aux_stride = 2

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 64, in_channels: int = 3, aux: bool = False):
        super().__init__()
        w = width
        self.inc = DoubleConv(in_channels, w)
        self.down = nn.ModuleList([Down(w, 2 * w), Down(2 * w, 4 * w), Down(4 * w, 8 * w), Down(8 * w, 16 * w)])
        self.up = nn.ModuleList([Up(16 * w, 8 * w), Up(8 * w, 4 * w), Up(4 * w, 2 * w), Up(2 * w, w)])
        self.head = nn.Conv2d(w, num_classes, 1)
        self.aux_head = nn.Conv2d(2 * w, num_classes, 1) if aux else None

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)  # the logits are cropped back below
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.up[:-1]:
            y = up(y, skips.pop())
        half = y  # the half-resolution stage
        y = self.up[-1](y, skips.pop())
        logits = self.head(y)[..., :h, :w]
        if not aux:
            return logits
        if self.aux_head is None:
            raise ValueError("this U-Net was built without an auxiliary head (aux=False)")
        s = self.aux_stride
        return logits, self.aux_head(half)[..., :-(-h // s), :-(-w // s)]


@register_model("unet", options=("width",))
def build_unet(num_classes: int, aux: bool, width: int = 64) -> UNet:
    """The classic U-Net of base width ``width`` (64: the 31M-parameter net of the paper)."""
    return UNet(num_classes=num_classes, width=width, aux=aux)
