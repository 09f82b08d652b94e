"""The tables models and encoders are chosen from by name: ``register_model`` and ``register_encoder``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class WeightsFile:
    """An official ImageNet weight file: where it is, its SHA-256 (whole, or the prefix torchvision's file names
    carry), its published top-1, where it comes from, and the name it is cached under."""

    url: str
    sha256: str
    top1: float
    source: str
    file: str = ""

    @property
    def filename(self) -> str:
        """The file's name in the torch.hub cache."""
        return self.file or self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class EncoderEntry:
    """An encoder: its builder, the key prefixes of its classifier (dropped from weight files), its ImageNet file."""

    build: Callable[[], nn.Module]
    classifier: tuple[str, ...]
    imagenet: WeightsFile | None


@dataclass(frozen=True)
class ModelEntry:
    """A model: its builder ``build(num_classes, aux, **options)`` and the config fields it takes as options
    (they shape its weights: resuming with other values is refused)."""

    build: Callable[..., nn.Module]
    options: tuple[str, ...]
    encoder: str | None = None


ENCODERS: dict[str, EncoderEntry] = {}
MODELS: dict[str, ModelEntry] = {}


def register_encoder(name: str, build: Callable[[], nn.Module], classifier: tuple[str, ...] = (),
                     imagenet: WeightsFile | None = None) -> None:
    """Add an encoder (and the U-Net on it, ``unet_<name>``)."""
    ENCODERS[name] = EncoderEntry(build, classifier, imagenet)
    from .encoder_unet import EncoderUNet  # the decoder module imports this one

    def build_unet(num_classes: int, aux: bool, decoder_channels: str | tuple[int, ...] = "256,128,64,32,16",
                   **_: Any) -> nn.Module:
        if isinstance(decoder_channels, str):  # as the config writes it
            decoder_channels = tuple(int(c) for c in decoder_channels.split(","))
        return EncoderUNet(name, num_classes, aux, decoder_channels)

    MODELS[f"unet_{name}"] = ModelEntry(build_unet, ("decoder_channels",), encoder=name)


def register_model(name: str, options: tuple[str, ...] = ()) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("unet", options=("width",))`` on ``build(num_classes, aux, width)``."""

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelEntry(build, options)
        return build
    return add
