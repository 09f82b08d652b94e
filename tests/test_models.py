"""Models by name: the classic U-Net (any input size, its parameter count, padding), every registered model
through training, resume, evaluation and export, the encoder U-Nets under DDP, the moving average of the
weights, starting from weights, and the learning-rate schedule and parameter groups."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from cityseg import checkpoint as ckpt
from cityseg.config import TrainConfig
from cityseg.losses import aux_ce_sum
from cityseg.models.common import pad_to_multiple
from cityseg.models.unet import UNet
from cityseg.optim import lr_factor


@pytest.mark.quick
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


# -- every registered model --------------------------------------------------------------------------------------
SMALL_DECODER = "32,16,16,8,8"  # the encoder U-Nets' decoder, narrowed for CPU tests


def test_every_registered_model_trains_resumes_evaluates_and_exports(synthetic_root, tmp_path):
    from cityseg.distributed import DistContext
    from cityseg.eval_job import load_model
    from cityseg.evaluation import Predictor, evaluate, val_loader
    from cityseg.export import write_prediction
    from cityseg.models import MODELS
    from conftest import tiny_trainer

    # the large encoders' checkpoints (up to 600 MB with the optimizer's state) go to memory, not disk
    runs = Path(tempfile.mkdtemp(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp_path))
    for name in MODELS:
        settings = dict(model=name, encoder_weights="none", decoder_channels=SMALL_DECODER, aux_weight=0.4,
                        eval_every=0, ckpt_every=0, num_pictures=0, max_val_images=1)
        first = tiny_trainer(synthetic_root, runs / name, max_iters=1, **settings)
        first.fit()
        first.log.close()
        again = tiny_trainer(synthetic_root, runs / name, max_iters=2, **settings)
        again.resume()
        assert again.iteration == 1, name
        again.fit()
        again.log.close()
        model, state = load_model(runs / name / "last.pt", torch.device("cpu"))
        shutil.rmtree(runs / name)
        assert state["iteration"] == 2 and type(model).__name__ == type(again.model).__name__, name
        loader, dataset = val_loader(str(synthetic_root), "val", DistContext(), 0, limit=1)
        written = []
        cm = evaluate(Predictor(model, torch.device("cpu"), None, True), loader,
                      lambda idx, labels, pred: written.extend(
                          write_prediction(tmp_path / "pred", dataset.samples[i].name, p)
                          for i, p in zip(idx, pred.to(torch.uint8).numpy())))
        assert int(cm.mat.sum()) == int((dataset.load(0)[1] != 255).sum()), name  # every labelled pixel scored
        assert len(written) == 1 and written[0].stat().st_size > 0, name
    shutil.rmtree(runs)


# -- encoder U-Nets under DDP, the moving average ------------------------------------------------------------------
def _encoder_args(root, out, *extra):
    from conftest import TINY

    return ["--data-root", str(root), "--out-dir", str(out), *TINY, "--model", "unet_resnet18", "--decoder-channels",
            SMALL_DECODER, "--aux-weight", "0.4", "--lr", "0.02", "--seed", "5", "--num-pictures", "0",
            "--ema-decay", "0.8", *extra]


def test_two_processes_of_two_train_like_one_of_four_with_a_pretrained_encoder_and_ema(synthetic_root, tmp_path):
    # --encoder-weights from a file: each rank reads it; DDP starts every rank from rank 0's weights anyway. The
    # tolerances are those of the classic U-Net's test (fp32 summation order).
    from conftest import run_script
    from encoder_recipe import recipe_state_dict

    keys = {k: tuple(s) for k, s in torch.load(REPO_FIXTURES / "resnet18.pt", weights_only=True)["keys"]}
    weights = tmp_path / "resnet18.pth"
    torch.save(recipe_state_dict(keys, 0), weights)
    args = ["--max-iters", "3", "--eval-every", "0", "--encoder-weights", str(weights), "--encoder-lr-mult", "0.1",
            "--no-decay-norm-bias", "--drop-path", "0.3", "--layer-decay", "0.8"]
    run_script("train.py", _encoder_args(synthetic_root, tmp_path / "one", *args, "--batch-size", "4"))
    run_script("train.py", _encoder_args(synthetic_root, tmp_path / "two", *args, "--batch-size", "2"), nproc=2)
    a, b = ckpt.load(tmp_path / "one" / "last.pt"), ckpt.load(tmp_path / "two" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 3
    for weights_a, weights_b in ((a["model"], b["model"]), (a["ema"]["weights"], b["ema"]["weights"])):
        for k, v in weights_a.items():
            if v.is_floating_point():
                torch.testing.assert_close(weights_b[k], v, atol=5e-5, rtol=1e-3, msg=k)
    start = recipe_state_dict(keys, 0)["layer4.1.conv2.weight"]  # the encoder started from the file's weights
    assert (a["model"]["encoder.layer4.1.conv2.weight"] - start).abs().max() < 0.05 * start.abs().max()
    groups = a["optimizer"]["param_groups"]
    # decoder with decay, decoder's 1-d parameters, then each encoder stage's two from layer4 (0.1 x 0.8^3) down to
    # the stem (0.1 x 0.8^7): --layer-decay with mmsegmentation's default top of num_layers 6 + 1
    expected = [(0.02, 5e-4), (0.02, 0.0)] + [(0.02 * 0.1 * 0.8 ** (7 - stage), wd) for stage in (4, 3, 2, 1, 0)
                                               for wd in (5e-4, 0.0)]
    assert [(pytest.approx(g["initial_lr"], rel=1e-12), g["weight_decay"]) for g in groups] == expected
    assert all(p.dim() <= 1 for g in range(1, len(groups), 2) for p in _group_shapes(a, g))


def _group_shapes(state, group):
    """The parameters (as tensors, from the saved momentum buffers) of one optimizer group."""
    ids = state["optimizer"]["param_groups"][group]["params"]
    return [state["optimizer"]["state"][i]["momentum_buffer"] for i in ids]


def test_a_stopped_run_with_ema_resumes_bitwise(synthetic_root, tmp_path):
    from conftest import run_script, start_training, wait_for_iteration

    args = ["--max-iters", "8", "--batch-size", "2", "--eval-every", "4", "--ckpt-every", "3", "--log-every", "1",
            "--encoder-weights", "none", "--drop-path", "0.3", "--layer-decay", "0.8"]
    run_script("train.py", _encoder_args(synthetic_root, tmp_path / "whole", *args))
    out = tmp_path / "split"
    with open(tmp_path / "first.log", "w") as log:
        proc = start_training(_encoder_args(synthetic_root, out, *args), 0, log=log)
        wait_for_iteration(out, 4, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    k = ckpt.load(out / "last.pt")["iteration"]
    assert 4 <= k < 8
    run_script("train.py", _encoder_args(synthetic_root, out, *args))
    a, b = ckpt.load(tmp_path / "whole" / "last.pt"), ckpt.load(out / "last.pt")
    for name in ("model",):
        assert all(torch.equal(v, b[name][k2]) for k2, v in a[name].items())
    assert a["ema"]["updates"] == b["ema"]["updates"] == 8
    assert all(torch.equal(v, b["ema"]["weights"][k2]) for k2, v in a["ema"]["weights"].items())


def test_evaluation_uses_the_moving_average_when_there_is_one(synthetic_root, tmp_path):
    from conftest import assert_matches_reference, reference_scores, run_script

    out = tmp_path / "run"
    run_script("train.py", _encoder_args(synthetic_root, out, "--max-iters", "4", "--batch-size", "2",
                                         "--eval-every", "4", "--encoder-weights", "none"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    during = next(r["val/miou"] for r in logged if "val/miou" in r)
    common = ["--checkpoint", str(out / "last.pt"), "--data-root", str(synthetic_root), "--device", "cpu",
              "--workers", "0", "--num-pictures", "0"]
    run_script("evaluate.py", [*common, "--out-dir", str(tmp_path / "auto")])
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert auto["weights"] == "ema" and auto["miou"] == pytest.approx(during, abs=1e-12)  # training evaluated it too
    assert_matches_reference(auto, reference_scores(out / "last.pt", synthetic_root))  # the reference takes the EMA
    run_script("evaluate.py", [*common, "--out-dir", str(tmp_path / "raw"), "--use-ema", "no"])
    raw = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    assert raw["weights"] == "model" and raw["num_pixels"] == auto["num_pixels"]
    plain = tmp_path / "plain"
    run_script("train.py", _encoder_args(synthetic_root, plain, "--max-iters", "1", "--batch-size", "2",
                                         "--eval-every", "0", "--encoder-weights", "none", "--ema-decay", "0"))
    proc = run_script("evaluate.py", [*common[:1], str(plain / "last.pt"), *common[2:], "--use-ema", "yes"],
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {plain / 'last.pt'}: holds no moving average of the weights (it was trained without --ema-decay); "
        f"pass --use-ema auto or no."), proc.stderr


@pytest.mark.quick
def test_the_moving_average_follows_its_formula():
    from cityseg.ema import EMA

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = EMA(model, decay=0.75)
    history = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        ema.update_parameters(model)
        history.append({k: v.clone() for k, v in model.state_dict().items()})
    expected = history[0]  # the first update copies, the next ones blend: e = 0.75 e + 0.25 w
    for h in history[1:]:
        expected = {k: 0.75 * v + 0.25 * h[k] if v.is_floating_point() else h[k] for k, v in expected.items()}
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k], msg=k)
        else:
            assert torch.equal(v, expected[k]), k
    assert ema.state()["updates"] == 3 and int(ema.module[1].num_batches_tracked) == 3


def test_init_from_starts_a_new_run_from_the_weights_and_refuses_another_models(synthetic_root, tmp_path):
    from conftest import run_script, train_args

    first = tmp_path / "first"
    run_script("train.py", train_args(synthetic_root, first, "--max-iters", "2", "--eval-every", "0"))
    second = tmp_path / "second"
    proc = run_script("train.py", train_args(synthetic_root, second, "--max-iters", "1", "--eval-every", "0",
                                             "--init-from", str(first / "last.pt"), "--lr", "1e-9", "--momentum",
                                             "0"))
    assert "Resumed" not in proc.stdout
    a, b = ckpt.load(first / "last.pt")["model"], ckpt.load(second / "last.pt")
    assert b["iteration"] == 1
    for k, v in a.items():
        if k.endswith("weight") and v.dim() == 4:  # convolutions: moved by at most 1e-9 x gradient
            torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=0, msg=k)
    proc = run_script("train.py", train_args(synthetic_root, tmp_path / "third", "--max-iters", "1", "--init-from",
                                             str(first / "last.pt"), "--model", "unet_resnet18"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {first / 'last.pt'}: not --model unet_resnet18 ("), \
        proc.stderr
    assert not (tmp_path / "third").exists()


REPO_FIXTURES = __import__("conftest").REPO / "tests" / "fixtures" / "encoders"


# -- stochastic depth (--drop-path) ---------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("name, blocks", [("unet_resnet18", 8), ("unet_resnet50", 16), ("unet_convnext_tiny", 18)])
def test_drop_path_rises_linearly_over_the_encoders_blocks_as_in_timm(name, blocks):
    from cityseg.models import create_model
    from cityseg.models.common import DropPath, set_drop_path

    model = create_model(name, decoder_channels=SMALL_DECODER)
    rates = set_drop_path(model, 0.4)
    # timm: torch.linspace(0, rate, sum(depths)) for ConvNeXt, rate * i / (n - 1) for ResNet
    assert rates == pytest.approx(torch.linspace(0, 0.4, blocks).tolist(), abs=1e-7)
    assert [m.p for m in model.modules() if isinstance(m, DropPath)] == rates
    assert not any(isinstance(m, DropPath) for m in model.decoder.modules())
    before = set(create_model(name, decoder_channels=SMALL_DECODER).state_dict())
    assert set(model.state_dict()) == before  # no new weights: ImageNet files and checkpoints load as before


@pytest.mark.quick
def test_drop_path_drops_whole_samples_as_timm_does_and_only_in_training():
    from cityseg.models.common import DropPath

    block = DropPath()
    block.p = 0.25
    x = torch.randn(64, 3, 4, 5)
    torch.manual_seed(0)
    ours = block(x)
    torch.manual_seed(0)  # timm's drop_path(x, 0.25, training=True), written out
    mask = x.new_empty((64, 1, 1, 1)).bernoulli_(0.75)
    assert torch.equal(ours, x * mask.div_(0.75))
    kept = (ours != 0).flatten(1)
    assert (kept.all(1) | ~kept.any(1)).all()  # each sample's branch whole or dropped
    assert 5 <= int((~kept.any(1)).sum()) <= 28  # about a quarter of 64
    block.eval()
    assert block(x) is x  # evaluation, and so ONNX exports: the identity


def test_ranks_drop_the_branches_of_the_samples_one_process_would():
    from cityseg.models.common import DropPath

    x = torch.randn(6, 2, 3, 3)
    whole = DropPath()
    whole.p = 0.5
    torch.manual_seed(3)
    expected = whole(x)
    for rank, part in enumerate(x.split(3)):  # 2 processes of 3 samples, every rank's generator alike
        block = DropPath()
        block.p, block.rank, block.world = 0.5, rank, 2
        torch.manual_seed(3)
        assert torch.equal(block(part), expected[3 * rank:3 * rank + 3])
