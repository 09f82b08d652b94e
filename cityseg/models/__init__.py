"""Models by name: one place builds every model, for training, evaluation, the checkpoint check and the bench.

The contract every registered model keeps:

- ``forward(x)`` takes a float NCHW batch normalised with the ImageNet mean and standard deviation (RGB), of
  any height and width, and returns logits ``(N, num_classes, H, W)`` at the input's size. Padding to the
  model's ``multiple`` (bottom and right, by reflection) happens inside the model, and the logits are cropped
  back.
- A model built with ``aux=True`` has an auxiliary head for training: ``forward(x, aux=True)`` returns
  ``(logits, aux_logits)``, the latter at ``1 / aux_stride`` of the input's resolution, covering
  ``ceil(H / aux_stride) x ceil(W / aux_stride)`` pixels. Its weights are named ``aux_head.*``, so that
  inference, which builds the model without it, drops them (:func:`inference_weights`).
- Encoders (``create_encoder``) return their feature maps from the finest stride (2 or 4) to stride 32, in
  order, with the key names of the library their ImageNet weights come from.

A new model is one file that calls :func:`register_model`; a new encoder is one file that calls
:func:`register_encoder` (which also registers the U-Net on it, ``unet_<encoder>``), imported below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..labels import NUM_CLASSES
from .registry import ENCODERS, MODELS, register_encoder, register_model
from . import unet  # noqa: F401  (registers "unet")
from .encoders import convnext, resnet  # noqa: F401  (register the encoders and their U-Nets)

__all__ = ["ENCODERS", "MODELS", "create_encoder", "create_model", "inference_weights", "model_from_config",
           "model_options", "register_encoder", "register_model"]


def create_model(name: str, num_classes: int = NUM_CLASSES, aux: bool = False, **options: Any) -> nn.Module:
    """The model registered as ``name``; ``options`` are the config fields it takes (``model_options``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    entry = MODELS[name]
    return entry.build(num_classes=num_classes, aux=aux, **{k: options[k] for k in entry.options if k in options})


def model_from_config(config: dict[str, Any], aux: bool = False) -> nn.Module:
    """The model a (saved) training config describes; checkpoints older than ``--model`` hold the classic U-Net."""
    name = config.get("model", "unet")
    return create_model(name, aux=aux, **{k: config[k] for k in model_options(name) if k in config})


def model_options(name: str) -> tuple[str, ...]:
    """The config fields that shape the weights of model ``name`` (besides its name and the auxiliary head)."""
    return MODELS[name].options


def create_encoder(name: str, weights: str | Path | None = None) -> nn.Module:
    """The encoder ``name`` alone (``forward(x)``: its feature maps, finest stride first); ``weights`` is None,
    ``"imagenet"`` (downloaded once into torch.hub's cache, hash-checked) or the path of a torchvision ``.pth``
    or timm ``.safetensors``/``.bin`` file."""
    from .weights import load_encoder_weights, resolve_weights

    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; registered: {', '.join(sorted(ENCODERS))}")
    encoder = ENCODERS[name].build()
    path = resolve_weights(name, "none" if weights is None else str(weights))
    if path is not None:
        encoder.load_state_dict(load_encoder_weights(path, name))
    return encoder


def inference_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights without the auxiliary head, which inference does not use."""
    return {k: v for k, v in state.items() if not k.startswith("aux_head.")}
