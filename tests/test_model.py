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


def test_the_auxiliary_head_classifies_the_half_resolution_stage():
    torch.manual_seed(0)
    model = UNet(width=8, aux=True).eval()
    x = torch.randn(2, 3, 50, 70)  # padded to 64x80 inside
    stage = {}
    model.up[2].register_forward_hook(lambda m, i, out: stage.update(half=out))
    logits, aux = model(x, aux=True)
    assert stage["half"].shape == (2, 16, 32, 40)  # 2 x width channels at half the padded resolution
    expected = torch.nn.functional.interpolate(model.aux_head(stage["half"]), size=(64, 80), mode="bilinear",
                                               align_corners=False)[..., :50, :70]
    torch.testing.assert_close(aux, expected)
    assert logits.shape == aux.shape == (2, 19, 50, 70)
    torch.testing.assert_close(model(x), logits)  # the main head is the same with or without the aux output
    plain = UNet(width=8)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_head.")})
    torch.testing.assert_close(plain.eval()(x), logits)
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert params == 16 * 19 + 19  # a 1x1 conv from 2 x width channels to the 19 classes
