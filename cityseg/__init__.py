"""cityseg: distributed U-Net training for Cityscapes semantic segmentation."""

__version__ = "0.1.0"
