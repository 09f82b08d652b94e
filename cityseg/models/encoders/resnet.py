"""ResNet encoders with torchvision's names and computation (v1.5: a bottleneck strides on its 3x3 conv), so
that torchvision's ImageNet files, and timm's ResNets, which share the names, load as they are."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..common import DropPath
from ..registry import WeightsFile, register_encoder

_URL = "https://download.pytorch.org/models/"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a residual connection (resnet18, resnet34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = DropPath()  # on the residual branch, before the shortcut is added (timm's place)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop_path(self.bn2(self.conv2(out)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (which carries the stride), 1x1 expand, and a residual connection (resnet50, 101)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.drop_path(self.bn3(self.conv3(out)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetEncoder(nn.Module):
    """The stem and four stages of a ResNet, without its classifier; ``forward`` returns the stem's output
    (stride 2) and each stage's (strides 4, 8, 16, 32)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            stage = [block(cin, planes, stride, downsample)]
            cin = planes * block.expansion
            stage += [block(cin, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.channels = (64, *(p * block.expansion for p in (64, 128, 256, 512)))
        self.strides = (2, 4, 8, 16, 32)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def stage_of(name: str) -> int:
        """The stage a parameter belongs to, for ``--layer-decay``: 0 for the stem, N for layerN."""
        return int(name[5]) if name.startswith("layer") else 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def _weights(file: str, top1: float, tag: str) -> WeightsFile:
    # torchvision's file names end in the first hex digits of the file's SHA-256, which the download checks
    return WeightsFile(url=_URL + file, sha256=file.rsplit("-", 1)[1].split(".")[0], top1=top1,
                       source=f"torchvision {tag}")


register_encoder("resnet18", lambda: ResNetEncoder(BasicBlock, (2, 2, 2, 2)), classifier=("fc.",),
                 imagenet=_weights("resnet18-f37072fd.pth", 69.758, "ResNet18_Weights.IMAGENET1K_V1"))
register_encoder("resnet34", lambda: ResNetEncoder(BasicBlock, (3, 4, 6, 3)), classifier=("fc.",),
                 imagenet=_weights("resnet34-b627a593.pth", 73.314, "ResNet34_Weights.IMAGENET1K_V1"))
register_encoder("resnet50", lambda: ResNetEncoder(Bottleneck, (3, 4, 6, 3)), classifier=("fc.",),
                 imagenet=_weights("resnet50-11ad3fa6.pth", 80.858, "ResNet50_Weights.IMAGENET1K_V2"))
register_encoder("resnet101", lambda: ResNetEncoder(Bottleneck, (3, 4, 23, 3)), classifier=("fc.",),
                 imagenet=_weights("resnet101-cd907fc2.pth", 81.886, "ResNet101_Weights.IMAGENET1K_V2"))
