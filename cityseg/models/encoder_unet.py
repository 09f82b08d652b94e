"""The U-Net decoder of segmentation_models_pytorch and of the U-Net paper, on a pretrained encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import pad_to_multiple
from .registry import ENCODERS

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """2x nearest upsampling, concatenation with the encoder's skip of that stride (if it has one), and two
    3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv1 = ConvBNReLU(cin + skip, cout)
        self.conv2 = ConvBNReLU(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class EncoderUNet(nn.Module):
    """A U-Net on a named encoder: five decoder stages from stride 32 back to full resolution, each taking the
    encoder's feature map of its stride as a skip where there is one, then a 1x1 classifier.

    With ``aux`` an auxiliary 1x1 classifier sits on the stride-8 decoder stage (``aux_stride``)."""

    multiple = 32  # five 2x downsamplings
    aux_stride = 8

    def __init__(self, encoder: str, num_classes: int, aux: bool = False,
                 decoder_channels: tuple[int, ...] = DECODER_CHANNELS):
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), got {decoder_channels}")
        self.encoder = ENCODERS[encoder].build()
        skips = dict(zip(self.encoder.strides, self.encoder.channels))
        cin, blocks = self.encoder.channels[-1], []
        for stride, cout in zip((16, 8, 4, 2, 1), decoder_channels):
            blocks.append(DecoderBlock(cin, skips.get(stride, 0), cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 1)
        self.aux_head = nn.Conv2d(decoder_channels[1], num_classes, 1) if aux else None

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        features = self.encoder(pad_to_multiple(x, self.multiple))
        by_stride = dict(zip(self.encoder.strides, features))
        y, aux_in = features[-1], None
        for block, stride in zip(self.decoder, (16, 8, 4, 2, 1)):
            y = block(y, by_stride.get(stride))
            if stride == self.aux_stride:
                aux_in = y
        logits = self.head(y)[..., :h, :w]
        if not aux:
            return logits
        if self.aux_head is None:
            raise ValueError("this model was built without an auxiliary head (aux=False)")
        s = self.aux_stride
        return logits, self.aux_head(aux_in)[..., :-(-h // s), :-(-w // s)]
