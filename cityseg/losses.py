"""Pixel losses as sums over a batch (the trainer divides by the labelled pixels of the global batch): plain
cross-entropy, and online hard example mining (OHEM) whose selection is made over the global batch.

OHEM follows mmsegmentation's ``OHEMPixelSampler(thresh, min_kept)``: keep the labelled pixels whose softmax
probability for their true class is below ``thresh``, but at least ``min_kept`` per image, the hardest ones.
Two differences, both on purpose:

- the hardest ``min_kept x images`` are taken over the *global* batch (all ranks), not per process, so N
  processes x batch B train the same weights as 1 x N*B;
- pixels tied with the last one kept are kept too, so at least ``min_kept x images`` pixels always are
  (mmsegmentation keeps those strictly below the next value, which can be fewer when values tie).

Probability below ``thresh`` is cross-entropy above ``-log(thresh)``, and the hardest pixels are those of the
largest cross-entropy, so the selection works on the per-pixel loss it has to compute anyway. The k-th
largest loss of the global batch is found without gathering any pixel: the float32 bits of a non-negative
float order like the float, so a histogram of the upper 16 bits, summed over ranks, tells the bin of the k-th
largest, and a histogram of the lower 16 bits within that bin tells the exact value. Two all-reduces of
counts, all on the device, no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import distributed as du
from .labels import IGNORE_INDEX

HI_BINS = 0x7F80 + 1  # upper 16 bits of the float32 bits of a value in [0, inf]
LO_BINS = 1 << 16


def ce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labelled pixels (fp32).

    Per-pixel losses, then a sum: CUDA's reducing cross-entropy kernel adds with atomics, which
    ``--deterministic`` refuses; an elementwise loss and a tree sum are deterministic and cost little."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none").sum()


def aux_ce_sum(logits: torch.Tensor, target: torch.Tensor, stride: int) -> torch.Tensor:
    """Cross-entropy of an auxiliary head's logits at its own resolution (``stride`` times coarser than
    ``target``), against the labels taken every ``stride`` pixels (nearest-neighbour downsampling), each
    counted ``stride**2`` times so that the sum stands for the full-resolution pixels.

    Upsampling the logits instead would make bilinear interpolation's backward, whose CUDA kernel adds with
    atomics (refused by ``--deterministic``), part of every step, and cost a full-resolution map of logits."""
    return ce_sum(logits, target[:, ::stride, ::stride]) * (stride * stride)


def ohem_sum(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """Cross-entropy summed over the hard pixels (:func:`hard_pixels`) of the global batch."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    keep = hard_pixels(loss.detach(), target != IGNORE_INDEX, thresh, min_kept * target.shape[0] * du.world_size())
    return (loss * keep).sum()


def _ce_loss(logits: torch.Tensor, target: torch.Tensor, cfg: Any) -> torch.Tensor:
    return ce_sum(logits, target)


def _ohem_loss(logits: torch.Tensor, target: torch.Tensor, cfg: Any) -> torch.Tensor:
    return ohem_sum(logits, target, cfg.ohem_thresh, cfg.ohem_min_kept)


#: ``--loss`` by name: ``loss(logits, target, cfg)`` is the main head's loss summed over the micro-batch's pixels
#: (``cfg`` carries the options a loss reads, such as ``ohem_thresh``). A new loss is one function and one line.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]] = {"ce": _ce_loss, "ohem": _ohem_loss}


@torch.no_grad()
def hard_pixels(loss: torch.Tensor, valid: torch.Tensor, thresh: float, k: int) -> torch.Tensor:
    """The mask of the pixels to learn from: labelled, and either of loss above ``-log(thresh)`` (probability
    below ``thresh``) or among the ``k`` largest losses of the global batch (ties with the k-th included).
    Collective when distributed: every rank calls it with its own pixels."""
    loss = loss.float()  # compared in the precision the k-th largest is found in
    hard = valid & (loss > -math.log(thresh))
    kth = kth_largest(loss, valid, k)
    return hard | (valid & (loss >= kth))


@torch.no_grad()
def kth_largest(values: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of the non-negative ``values`` where ``valid``, over all ranks (a 0-d tensor on
    their device); the smallest one when fewer than ``k`` are valid, +inf when none is or ``k`` is 0.

    Every index stays a one-element tensor read with ``gather``: indexing with a 0-d tensor (``above[j]``) would
    read it back to the host (``.item()``), a GPU stream synchronisation."""
    bits = values.float().clamp_min(0).contiguous().view(torch.int32).reshape(-1).long()
    valid = valid.reshape(-1)
    hi = (bits >> 16).clamp(0, HI_BINS - 1)  # NaN (above +inf's bits) counts as +inf
    counts_hi = _histogram(hi, valid, HI_BINS)
    want = torch.clamp(counts_hi.sum(), max=k).reshape(1)  # the rank from the top to find
    above = counts_hi.flip(0).cumsum(0)  # above[j]: how many are in bins HI_BINS-1-j and higher
    j = torch.searchsorted(above, want).clamp_max(HI_BINS - 1)
    bin_hi = HI_BINS - 1 - j
    want_lo = want - (above.gather(0, j) - counts_hi.gather(0, bin_hi))  # its rank from the top within that bin
    above_lo = _histogram(bits & 0xFFFF, valid & (hi == bin_hi), LO_BINS).flip(0).cumsum(0)
    bin_lo = LO_BINS - 1 - torch.searchsorted(above_lo, want_lo).clamp_max(LO_BINS - 1)
    value = ((bin_hi << 16) | bin_lo).to(torch.int32).view(torch.float32)
    return torch.where(want > 0, value, torch.full_like(value, math.inf))[0]


def _histogram(index: torch.Tensor, counted: torch.Tensor, bins: int) -> torch.Tensor:
    """How many ``counted`` elements fall in each bin ``index`` (in ``[0, bins)``), summed over ranks.

    Every element adds 0 or 1 to its own bin, so uncounted ones do not pile onto one sentinel address
    (millions of atomics on one word on a GPU); ``torch.bincount`` is avoided because it reads the largest
    index back to the host to size its output."""
    counts = torch.zeros(bins, dtype=torch.int64, device=index.device)
    counts.index_add_(0, index, counted.long())
    return du.all_reduce_sum(counts)
