"""The U-Net: any input size, the classic parameter count, and the LR schedule it trains with."""

from __future__ import annotations

import pytest
import torch

from cityseg.config import TrainConfig
from cityseg.engine import lr_factor
from cityseg.losses import aux_ce_sum
from cityseg.model import UNet, pad_to_multiple


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
    # the aux logits stay at the stage's resolution, covering the input's ceil(50/2) x ceil(70/2) pixels
    torch.testing.assert_close(aux, model.aux_head(stage["half"])[..., :25, :35])
    assert logits.shape == (2, 19, 50, 70) and model.aux_stride == 2
    torch.testing.assert_close(model(x), logits)  # the main head is the same with or without the aux output
    plain = UNet(width=8)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_head.")})
    torch.testing.assert_close(plain.eval()(x), logits)
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert params == 16 * 19 + 19  # a 1x1 conv from 2 x width channels to the 19 classes


@pytest.mark.parametrize("hw", [(50, 70), (16, 33), (17, 16), (64, 64), (3, 40), (1, 1)])
def test_padding_equals_reflection_padding_forward_and_backward(hw):
    # pad_to_multiple builds reflection padding from slices, flips and concatenations (whose CUDA backward is
    # deterministic); values and gradients must be those of F.pad(mode="reflect"), zeros below its size limit.
    x = torch.randn(2, 3, *hw, dtype=torch.float64, requires_grad=True)
    ph, pw = (-hw[0]) % 16, (-hw[1]) % 16
    mode = "reflect" if min(hw) > max(ph, pw) else "constant"
    ours, theirs = pad_to_multiple(x, 16), torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
    assert torch.equal(ours, theirs)
    w = torch.randn_like(ours)
    g_ours, = torch.autograd.grad((ours * w).sum(), x)
    g_theirs, = torch.autograd.grad((theirs * w).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12)


def test_the_auxiliary_loss_uses_every_second_label_and_counts_it_four_times():
    logits = torch.randn(2, 19, 3, 4, dtype=torch.float64)
    target = torch.randint(0, 19, (2, 5, 8))
    target[0, 2, 2] = 255  # an ignored pixel among the sampled ones
    expected = 0.0
    for n in range(2):
        for i in range(3):
            for j in range(4):
                label = int(target[n, 2 * i, 2 * j])
                if label != 255:
                    expected += 4 * float(-logits[n, :, i, j].log_softmax(0)[label])
    assert aux_ce_sum(logits, target, 2).item() == pytest.approx(expected, rel=1e-6)  # summed in fp32
