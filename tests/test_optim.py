"""The optimizer's state keeps its parameters' strides through every change of layout the code makes.

CUDA's fused SGD and AdamW refuse a step whose parameters, gradients and state tensors differ in strides
(``check_fast_path_restrictions``); the CPU's fused kernels do not check, so the strides are compared here.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn as nn

from cityseg import checkpoint as ckpt
from cityseg.config import TrainConfig
from cityseg.models.unet import UNet
from cityseg.optim import build_optimizer
from conftest import REPO, tiny_trainer


def bench_gpu():
    """bench/gpu.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def state_layouts(optimizer: torch.optim.Optimizer) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(parameter strides, state strides) for every tensor of the state shaped like its parameter."""
    return [(p.stride(), v.stride()) for group in optimizer.param_groups for p in group["params"]
            for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]


def assert_state_matches(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Every parameter of the model is in the optimizer, once, and every state tensor has its strides."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) and {id(p) for p in params} == {
        id(p) for p in model.parameters()}
    layouts = state_layouts(optimizer)
    assert layouts and all(p == s for p, s in layouts), [(p, s) for p, s in layouts if p != s][:3]


def channels_last_convs(model: nn.Module) -> list[bool]:
    """For each 3x3 convolution, whether its weight is channels_last (1x1 weights are both layouts at once)."""
    return [m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def batch(n: int = 2, hw: tuple[int, int] = (64, 128)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One micro-batch of uint8 images and labels, as the loader gives them."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, *hw, 3), generator=g, dtype=torch.uint8),
             torch.randint(0, 19, (n, *hw), generator=g, dtype=torch.uint8))]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_new_optimizer_gives_its_state_the_parameters_strides(optimizer):
    model = UNet(width=8).to(memory_format=torch.channels_last)
    opt = build_optimizer(TrainConfig(optimizer=optimizer, data_root="x"), model, torch.device("cpu"))
    assert all(channels_last_convs(model)) and not all(p.is_contiguous() for p in model.parameters())
    model(torch.randn(1, 3, 32, 64).contiguous(memory_format=torch.channels_last)).sum().backward()
    opt.step()  # AdamW makes its moments here; SGD's momentum buffers were made by build_optimizer
    assert_state_matches(opt, model)


@pytest.mark.parametrize("name", ["eager_nchw", "eager_channels_last", "eager_syncbn"])
def test_each_bench_row_builds_its_optimizer_for_its_final_model(synthetic_root, tmp_path, name):
    # bench/gpu.py's rows change a new Trainer's model (memory format, BatchNorm) and must then rebuild its
    # optimizer; on CUDA an NCHW model with channels_last momentum buffers fails its first fused SGD step.
    gpu = bench_gpu()
    row = gpu.STEP_ROWS[name]
    trainer = gpu.trainer_for(synthetic_root, tmp_path, width=8, batch=2, row=row, device="cpu")
    try:
        assert all(channels_last_convs(trainer.model)) == row.channels_last
        assert not any(channels_last_convs(trainer.model)) == (not row.channels_last)
        assert trainer.channels_last == row.channels_last and trainer.predictor.model is trainer.model
        assert_state_matches(trainer.optimizer, trainer.model)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train_step(batch())
        assert_state_matches(trainer.optimizer, trainer.model)
        changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == len(before), set(before) - set(changed)  # the optimizer updates this model
    finally:
        trainer.log.close()


def test_a_resumed_optimizer_keeps_its_parameters_strides(synthetic_root, tmp_path):
    first = tiny_trainer(synthetic_root, tmp_path / "a")
    first.train_step(batch())
    ckpt.save(first.state_dict(), tmp_path / "a.pt")
    first.log.close()
    resumed = tiny_trainer(synthetic_root, tmp_path / "b")
    resumed.load_state_dict(ckpt.load(tmp_path / "a.pt"))
    assert_state_matches(resumed.optimizer, resumed.model)
    resumed.log.close()


def test_a_checkpoint_of_an_nchw_model_resumes_with_channels_last_state(synthetic_root, tmp_path):
    old = tiny_trainer(synthetic_root, tmp_path / "a")
    old.model.to(memory_format=torch.contiguous_format)  # as a run of an older cityseg trained on CPU
    for state in old.optimizer.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].contiguous()
    old.channels_last = False
    old.train_step(batch())
    ckpt.save(old.state_dict(), tmp_path / "a.pt")
    old.log.close()
    resumed = tiny_trainer(synthetic_root, tmp_path / "b")
    resumed.load_state_dict(ckpt.load(tmp_path / "a.pt"))
    assert all(channels_last_convs(resumed.model))
    assert_state_matches(resumed.optimizer, resumed.model)
    resumed.log.close()


def mmseg_scale(name: str, decay: float, num_layers: int) -> float:
    """mmsegmentation's LearningRateDecayOptimizerConstructor, stage_wise, for a ConvNeXt backbone, applied to
    cityseg's names translated to that backbone's (stem -> downsample_layers.0, stages.N.downsample ->
    downsample_layers.N, stages.N.blocks -> stages.N) and the rest as head parameters."""
    if name.startswith("encoder.stem."):
        name = "backbone.downsample_layers.0." + name[len("encoder.stem."):]
    elif name.startswith("encoder.stages.") and name.split(".")[3] == "downsample":
        name = f"backbone.downsample_layers.{name.split('.')[2]}." + ".".join(name.split(".")[4:])
    elif name.startswith("encoder.stages."):
        parts = name.split(".")
        name = ".".join(["backbone.stages", parts[2], *parts[4:]])
    else:
        name = "decode_head." + name
    layers = num_layers + 2
    if name.startswith("backbone.downsample_layers"):
        layer_id = 0
    elif name.startswith("backbone.stages"):
        layer_id = int(name.split(".")[2]) + 1
    else:
        layer_id = layers - 1
    return decay ** (layers - layer_id - 1)


@pytest.mark.quick
@pytest.mark.parametrize("decay, num_layers, mult", [(0.9, 6, 1.0), (0.75, 12, 0.5)])
def test_layer_decay_gives_each_convnext_parameter_mmsegmentations_stage_wise_rate(decay, num_layers, mult):
    from cityseg.models import create_model
    from cityseg.optim import param_groups

    model = create_model("unet_convnext_tiny", aux=True, decoder_channels="16,16,8,8,8")
    cfg = TrainConfig(data_root="x", model="unet_convnext_tiny", lr=0.1, weight_decay=0.05, decay_norm_bias=False,
                      layer_decay=decay, layer_decay_num_layers=num_layers, encoder_lr_mult=mult)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(cfg, model) for p in g["params"]}
    assert set(got) == set(names.values())
    for name, p in model.named_parameters():
        expected = 0.1 * mmseg_scale(name, decay, num_layers) * (mult if name.startswith("encoder.") else 1.0)
        assert got[name][0] == pytest.approx(expected, rel=1e-12), name
        assert got[name][1] == (0.0 if p.ndim <= 1 else 0.05), name  # 1-d parameters exempt, as before
    # a few by hand (0.9, 6): the stem and the downsampling between stages 0.9^7, stage 1's blocks 0.9^6, stage
    # 4's 0.9^3, decoder and both heads the full rate
    if decay == 0.9:
        for name, scale in [("encoder.stem.0.weight", 0.9 ** 7), ("encoder.stages.2.downsample.1.weight", 0.9 ** 7),
                            ("encoder.stages.0.blocks.2.conv_dw.weight", 0.9 ** 6),
                            ("encoder.stages.3.blocks.0.mlp.fc1.weight", 0.9 ** 3), ("decoder.0.conv1.0.weight", 1),
                            ("head.weight", 1), ("aux_head.weight", 1)]:
            assert got[name][0] == pytest.approx(0.1 * scale, rel=1e-12), name


def test_layer_decay_counts_resnet_stages_the_same_way():
    from cityseg.models import create_model
    from cityseg.optim import param_groups

    model = create_model("unet_resnet50", decoder_channels="16,16,8,8,8")
    cfg = TrainConfig(data_root="x", model="unet_resnet50", lr=1.0, layer_decay=0.5, layer_decay_num_layers=6)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: g["lr"] for g in param_groups(cfg, model) for p in g["params"]}
    for name, stage in [("encoder.conv1.weight", 0), ("encoder.bn1.bias", 0), ("encoder.layer1.0.conv1.weight", 1),
                        ("encoder.layer2.0.downsample.0.weight", 2), ("encoder.layer4.2.bn3.weight", 4)]:
        assert got[name] == 0.5 ** (7 - stage), name
    assert {v for n, v in got.items() if not n.startswith("encoder.")} == {1.0}
    cfg.layer_decay = 1.0  # off: one rate for the encoder, as before
    assert {g["lr"] for g in param_groups(cfg, model)} == {1.0}
