"""Pretrained encoders, each registered by its own module (``register_encoder``)."""
