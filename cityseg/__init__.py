"""cityseg: distributed U-Net training for Cityscapes semantic segmentation.

The public Python API is reached from here and imported on first use (``import cityseg`` itself is light):

    seg = cityseg.load("runs/unet/best.pt")                             # a trained model, evaluate.py's way
    mask = seg.predict("photo.jpg")                                     # H x W uint8 trainIds
    picture = cityseg.overlay(image, mask)                              # also colorize, to_label_ids, CLASSES
    encoder = cityseg.create_encoder("resnet50", weights="imagenet")   # feature maps, finest stride first
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {"load": "cityseg.api", "Segmenter": "cityseg.api", "colorize": "cityseg.labels",
           "to_label_ids": "cityseg.labels", "overlay": "cityseg.visualize", "create_encoder": "cityseg.models",
           "create_model": "cityseg.models"}
__all__ = sorted([*_PUBLIC, "CLASSES"])


def __getattr__(name: str) -> Any:
    if name == "CLASSES":  # the 19 Cityscapes classes, in trainId order
        from .labels import CLASS_NAMES

        return CLASS_NAMES
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cityseg' has no attribute {name!r}")
