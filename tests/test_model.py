"""The U-Net: any input size, the classic parameter count, and the LR schedule it trains with."""

from __future__ import annotations

import pytest
import torch

from cityseg.config import TrainConfig
from cityseg.engine import lr_factor
from cityseg.model import UNet


@pytest.mark.parametrize("hw", [(64, 128), (37, 53), (1, 1), (16, 200)])
def test_any_input_size_gives_logits_of_that_size(hw):
    model = UNet(width=8).eval()
    x = torch.randn(2, 3, *hw)
    assert model(x).shape == (2, 19, *hw)


def test_odd_sizes_are_padded_bottom_right_and_cropped_back():
    torch.manual_seed(0)
    model = UNet(width=8).eval()
    x = torch.randn(1, 3, 50, 70)
    # independent expectation: reflect-pad to the next multiple of 16 (64x80) by hand, run, crop top-left
    padded = torch.nn.functional.pad(x, (0, 10, 0, 14), mode="reflect")
    torch.testing.assert_close(model(x), model(padded)[..., :50, :70])
    assert not torch.allclose(model(x), model(torch.nn.functional.pad(x, (10, 0, 14, 0), mode="reflect"))[..., 14:, 10:])


def test_width_64_is_the_classic_31m_net():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    two, nineteen = count(UNet(width=64, num_classes=2)), count(UNet(width=64))
    # milesial/Pytorch-UNet with transposed-conv upsampling: about 31.04M parameters for 2 classes.
    assert abs(two - 31.04e6) < 0.01e6, two
    assert nineteen - two == 17 * (64 + 1)  # 17 more 1x1 head filters of 64 weights and a bias


def test_lr_warmup_then_poly():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, warmup_factor=0.1, poly_power=0.9)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx((0.1 * 0.5 + 0.5) * (1 - 0.05) ** 0.9)
    assert lr_factor(50, cfg) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, cfg) == 0.0
    assert all(lr_factor(i, cfg) >= lr_factor(i + 1, cfg) for i in range(10, 100))
