"""cityseg: distributed U-Net training for Cityscapes semantic segmentation.

The public Python API is reached from here and imported on first use (``import cityseg`` itself is light):

    encoder = cityseg.create_encoder("resnet50", weights="imagenet")   # feature maps, finest stride first
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {"create_encoder": "cityseg.models", "create_model": "cityseg.models"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cityseg' has no attribute {name!r}")
