"""OHEM: the hand-computed selection, the k-th largest without gathering, and the same pixels on any number of
processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from cityseg.losses import hard_pixels, kth_largest, ohem_sum
from conftest import free_port, spawn

IGNORE = 255
# Two images of five pixels, three classes. The probability each pixel gives its true class; None = ignored.
PROBS = [[0.9, 0.5, 0.5, 0.95, None],
         [0.2, 0.8, 0.8, 0.8, 0.99]]


def _batch():
    """Logits whose softmax gives each pixel exactly PROBS' probability for its true class (class 0)."""
    logits = torch.zeros(2, 3, 1, 5, dtype=torch.float64)
    target = torch.zeros(2, 1, 5, dtype=torch.long)
    for n, row in enumerate(PROBS):
        for j, p in enumerate(row):
            if p is None:
                target[n, 0, j] = IGNORE
                p = 0.1  # a hard pixel that must never be selected
            rest = (1 - p) / 2
            logits[n, :, 0, j] = torch.tensor([math.log(p), math.log(rest), math.log(rest)])
    return logits, target


def _hand(kept: list[tuple[int, int]]):
    """The OHEM sum of the listed pixels, from PROBS: sum of -log p."""
    return sum(-math.log(PROBS[n][j]) for n, j in kept)


# Valid probabilities in order: 0.2 (1,0); 0.5 (0,1) (0,2); 0.8 (1,1) (1,2) (1,3); 0.9 (0,0); 0.95 (0,3); 0.99.
CASES = [
    # thresh 0.7 keeps p < 0.7; a floor of 1 per image (2 in all) adds nothing beyond those three
    (0.7, 1, [(1, 0), (0, 1), (0, 2)]),
    # a floor of 2 per image = 4 pixels: the 4th hardest is a 0.8, tied with two more; all three are kept
    (0.7, 2, [(1, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]),
    # a floor of 4 per image = 8 pixels: everything but the easiest (0.99)
    (0.7, 4, [(1, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (0, 0), (0, 3)]),
    # a floor above the 9 labelled pixels keeps them all, and never the ignored one
    (0.7, 50, [(1, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (0, 0), (0, 3), (1, 4)]),
    # no floor: the threshold alone; a threshold of 0.3 keeps only the 0.2
    (0.3, 0, [(1, 0)]),
    # the floor wins over a low threshold: 1 per image = 2 pixels, the 0.2 and the two tied 0.5s
    (0.3, 1, [(1, 0), (0, 1), (0, 2)]),
]


@pytest.mark.quick
@pytest.mark.parametrize("thresh, min_kept, kept", CASES)
def test_ohem_keeps_the_hand_computed_pixels(thresh, min_kept, kept):
    logits, target = _batch()
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    mask = hard_pixels(loss, target != IGNORE, thresh, min_kept * 2)
    assert sorted(tuple(i) for i in torch.nonzero(mask[:, 0]).tolist()) == sorted(kept)
    total = ohem_sum(logits.float(), target, thresh, min_kept)
    assert total.item() == pytest.approx(_hand(kept), rel=1e-5)


def test_kth_largest_matches_sorting():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 400, (1,), generator=g))
        values = torch.rand(n, generator=g) * 10.0 ** int(torch.randint(-4, 3, (1,), generator=g))
        if trial % 3 == 0:
            values = (values * 4).round() / 4  # many ties
        valid = torch.rand(n, generator=g) > 0.3
        k = int(torch.randint(0, n + 5, (1,), generator=g))
        top = values[valid].sort(descending=True).values
        expected = math.inf if k == 0 or not len(top) else top[min(k, len(top)) - 1].item()
        assert kth_largest(values, valid, k).item() == expected, trial


def _global_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loss, valid = _global_data()
        half = slice(rank * 3, rank * 3 + 3)  # this rank's 3 images of the 6
        torch.save(hard_pixels(loss[half], valid[half], 0.5, 40 * 6), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _global_data():
    g = torch.Generator().manual_seed(1)
    loss = (torch.rand(6, 8, 16, generator=g) * 8).round() / 4  # losses in steps of 1/4: ties everywhere
    loss[:3] *= 0.25  # the first rank's images are easy: a per-rank selection would keep others than a global one
    return loss, torch.rand(6, 8, 16, generator=g) > 0.2


def test_the_selection_is_made_over_the_global_batch(tmp_path):
    spawn(_global_worker, (free_port(), str(tmp_path)))
    loss, valid = _global_data()
    alone = hard_pixels(loss, valid, 0.5, 40 * 6)  # one process with all 6 images
    ranks = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)])
    assert torch.equal(ranks, alone)
    per_rank = torch.cat([hard_pixels(loss[s], valid[s], 0.5, 40 * 3) for s in (slice(0, 3), slice(3, 6))])
    assert not torch.equal(per_rank, alone)  # so the test tells global from per-rank selection
