"""Pieces every model shares."""

from __future__ import annotations

import torch
import torch.nn as nn
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


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (``--drop-path``), with timm's semantics: in training each sample's
    branch is dropped with probability ``p`` and the kept ones are scaled by ``1 / (1 - p)``; the identity in
    evaluation, and so in ONNX exports. :func:`set_drop_path` sets ``p`` per block.

    The masks of a step are drawn for the whole global batch on every rank, from the random generator the ranks
    share (seeded alike, restored alike on resume), and each rank takes its own slice of them: N processes of B
    samples drop the branches of the same samples as 1 process of N x B."""

    def __init__(self) -> None:
        super().__init__()
        self.p = 0.0
        self.rank, self.world = 0, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep, n = 1.0 - self.p, x.shape[0]
        mask = x.new_empty(n * self.world).bernoulli_(keep)[self.rank * n:(self.rank + 1) * n]
        if keep > 0.0:
            mask = mask / keep
        return x * mask.view(n, *([1] * (x.ndim - 1)))


def set_drop_path(model: nn.Module, rate: float, rank: int = 0, world_size: int = 1) -> list[float]:
    """Give the model's residual blocks their drop probabilities, rising linearly from 0 at the first block to
    ``rate`` at the last (timm's rule for ResNet and ConvNeXt), for a process of rank ``rank`` among
    ``world_size``; the rates, in block order."""
    blocks = [m for m in model.modules() if isinstance(m, DropPath)]
    rates = [rate * i / (len(blocks) - 1) if len(blocks) > 1 else 0.0 for i in range(len(blocks))]
    for block, p in zip(blocks, rates):
        block.p, block.rank, block.world = p, rank, world_size
    return rates
