"""ConvNeXt encoders with timm's names and computation (``stem.*``, ``stages.N.*``), so that timm's ImageNet
files load as they are; the features are the stage outputs, before any final norm."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import DropPath
from ..registry import WeightsFile, register_encoder

_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """Linear, GELU, linear (on channels-last maps)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, MLP (4x), layer scale, residual connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.drop_path = DropPath()  # after the layer scale, before the residual sum (timm's place)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + self.drop_path(y * self.gamma.reshape(1, -1, 1, 1))


class ConvNeXtStage(nn.Module):
    """A 2x2 strided downsampling (after a LayerNorm), except in the first stage, then the blocks."""

    def __init__(self, cin: int, cout: int, depth: int):
        super().__init__()
        self.downsample = nn.Identity() if cin == cout else \
            nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, cout, 2, stride=2))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cout) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtEncoder(nn.Module):
    """A 4x4 patchify stem and four stages; ``forward`` returns each stage's output (strides 4, 8, 16, 32)."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(i - 1, 0)], dims[i], d) for i, d in enumerate(depths)])
        self.channels, self.strides = tuple(dims), (4, 8, 16, 32)
        for m in self.modules():  # timm's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def stage_of(name: str) -> int:
        """The stage a parameter belongs to, for ``--layer-decay``, as mmsegmentation's stage-wise rule for ConvNeXt
        counts them: 0 for the stem and for every downsampling layer between stages, N + 1 for the blocks of
        stage N."""
        parts = name.split(".")
        return int(parts[1]) + 1 if parts[0] == "stages" and parts[2] == "blocks" else 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _weights(repo: str, sha256: str, top1: float) -> WeightsFile:
    return WeightsFile(url=_HF.format(repo), sha256=sha256, top1=top1, source=f"timm/{repo} (model.safetensors)",
                       file=f"{repo}.safetensors")


# timm's default pretrained tags (ImageNet-12k pretraining, ImageNet-1k fine-tuning); the SHA-256 of each file
# is its Git LFS object id on the Hugging Face hub.
register_encoder("convnext_tiny", lambda: ConvNeXtEncoder((3, 3, 9, 3), (96, 192, 384, 768)), classifier=("head.",),
                 imagenet=_weights("convnext_tiny.in12k_ft_in1k",
                                   "a1aefa409b513cf209b085424eb3efffe4e4a9f511491bc2c12ea35209e6bb95", 84.45))
register_encoder("convnext_small", lambda: ConvNeXtEncoder((3, 3, 27, 3), (96, 192, 384, 768)),
                 classifier=("head.",),
                 imagenet=_weights("convnext_small.in12k_ft_in1k",
                                   "eb6f6171daa484fac5e74c28cba90de9328939c03ee96d7e163a0c421898280e", 85.33))
