"""Pieces every model shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of an NCHW batch to a multiple of ``multiple`` by reflection (zeros for inputs
    smaller than the padding).

    The same values as ``F.pad(mode="reflect")``, built from slices, flips and concatenations, whose backward
    passes are plain copies: reflection padding's own CUDA backward adds with atomics, which ``--deterministic``
    refuses."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if _exporting():  # symbolic sizes: no branch on them (the ONNX graph's inputs are at least the multiple a side)
        x = torch.cat([x, x[..., h - 1 - ph:h - 1, :].flip(-2)], dim=-2)
        return torch.cat([x, x[..., w - 1 - pw:w - 1].flip(-1)], dim=-1)
    if not (ph or pw):
        return x
    if min(h, w) <= max(ph, pw):
        return F.pad(x, (0, pw, 0, ph))
    if ph:
        x = torch.cat([x, x[..., h - 1 - ph:h - 1, :].flip(-2)], dim=-2)
    if pw:
        x = torch.cat([x, x[..., w - 1 - pw:w - 1].flip(-1)], dim=-1)
    return x


def _exporting() -> bool:
    """True while torch.export traces the model (the ONNX export); torch 2.4 has no such tracing."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())
