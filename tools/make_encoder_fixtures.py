"""Write the encoder reference fixtures of ``tests/fixtures/encoders/`` from torchvision's and timm's models.

Not part of the package or the test suite, and not runnable in the project's own environment: torchvision and
timm are not project dependencies. Run it in a scratch venv outside the repository::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0                 # the CPU wheel the project pins
    /tmp/refvenv/bin/pip install --no-deps torchvision==0.29.1 timm==1.0.31
    /tmp/refvenv/bin/pip install pyyaml huggingface_hub safetensors numpy pillow
    /tmp/refvenv/bin/python tools/make_encoder_fixtures.py    # from the repository root

(``--no-deps`` keeps pip from replacing torch: torchvision 0.29.1 asks for torch>=2.14.) The torchvision wheel's
C ops do not load beside the CPU torch, and its ``_meta_registrations`` then fails on
``torch.library.register_fake("torchvision::nms")``; this script makes those registrations tolerant before it
imports torchvision (only the pure-Python ``torchvision.models.resnet`` code is used). No weights are downloaded:
every model is built with random init and then loaded with ``tests/encoder_recipe.py``'s deterministic state dict.

For each encoder it writes ``<out>/<name>.pt`` (``torch.load(path, weights_only=True)``)::

    name, source ("torchvision 0.29.1" / "timm 1.0.31"), torch (version), recipe_seed (0),
    keys: [[key, [shape...]], ...] sorted by key, classifier keys (fc.* / head.*) dropped,
    recipe_checksums: [[key, encoder_recipe.recipe_checksum(tensor)], ...] in the same order (compare with ==),
    input, features, strides (resnet18, resnet50, convnext_tiny only): the input and the fp32 NCHW features,
    pretrained: the library's pretrained-weight metadata (informational).

ResNet features are ``[relu(bn1(conv1(x))), layer1, layer2, layer3, layer4]`` (strides 2, 4, 8, 16, 32) of
``torchvision.models.<name>(weights=None)`` in eval mode on ``recipe_input((1, 3, 32, 48), seed=1)``, checked
against timm's ``<name>.forward_intermediates(x, indices=5, intermediates_only=True)`` with the same weights.
ConvNeXt features are the four stage outputs (strides 4, 8, 16, 32, before ``norm_pre``/``head.norm``) of
``timm.create_model(<name>, pretrained=False)`` in eval mode from ``forward_intermediates(x,
intermediates_only=True)`` on ``recipe_input((1, 3, 64, 96), seed=1)``, checked against ``stem`` + ``stages[i]``
run by hand and against a functional re-implementation from the state dict.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
CONVNEXTS = ("convnext_tiny", "convnext_small")
WITH_FEATURES = ("resnet18", "resnet50", "convnext_tiny")
RESNET_INPUT = (1, 3, 32, 48)
CONVNEXT_INPUT = (1, 3, 64, 96)
INPUT_SEED = 1
RECIPE_SEED = 0


def _load_recipe():
    spec = importlib.util.spec_from_file_location("encoder_recipe", REPO / "tests" / "encoder_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_libraries():
    """Import torchvision (fake-op registrations made tolerant of its missing C ops) and timm."""
    original = torch.library.register_fake

    def tolerant_register_fake(op, func=None, /, *args, **kwargs):
        def register(fn):
            try:
                return original(op, fn, *args, **kwargs)
            except RuntimeError:  # "operator torchvision::nms does not exist": the C ops did not load
                return fn

        return register(func) if func is not None else register

    torch.library.register_fake = tolerant_register_fake
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision
            import torchvision.models
    finally:
        torch.library.register_fake = original
    import timm

    return torchvision, timm


def _shapes(model, drop: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sorted(model.state_dict().items()) if not k.startswith(drop)}


def _load_recipe_weights(model, shapes, recipe):
    """Load the recipe state dict strictly, the dropped classifier keys taken from the model itself."""
    sd = recipe.recipe_state_dict(shapes, seed=RECIPE_SEED)
    sd.update({k: v for k, v in model.state_dict().items() if k not in shapes})
    model.load_state_dict(sd, strict=True)
    return sd


def _fixed(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _resnet_features(m, x):
    f = [m.relu(m.bn1(m.conv1(x)))]
    y = m.maxpool(f[0])
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        y = layer(y)
        f.append(y)
    return f


def _convnext_by_function(sd, x, depths):
    """ConvNeXt (timm layout, conv_mlp=False) from the state dict with torch.nn.functional only."""

    def ln2d(t, p):  # LayerNorm2d: LayerNorm over C of an NCHW tensor, eps 1e-6
        t = F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], sd[p + ".weight"], sd[p + ".bias"], 1e-6)
        return t.permute(0, 3, 1, 2)

    x = ln2d(F.conv2d(x, sd["stem.0.weight"], sd["stem.0.bias"], stride=4), "stem.1")
    feats = []
    for i, depth in enumerate(depths):
        if i > 0:
            s = f"stages.{i}.downsample"
            x = F.conv2d(ln2d(x, s + ".0"), sd[s + ".1.weight"], sd[s + ".1.bias"], stride=2)
        for j in range(depth):
            b = f"stages.{i}.blocks.{j}."
            y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, y.shape[-1:], sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))  # exact (erf) GELU
            y = F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"]).permute(0, 3, 1, 2)
            x = x + y * sd[b + "gamma"].reshape(1, -1, 1, 1)
        feats.append(x)
    return feats


def _plain(obj):
    """Tuples to lists, recursively, for a metadata dict that torch.load(weights_only=True) reads back."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _torchvision_pretrained(torchvision, name):
    weights = torchvision.models.get_model_weights(name)
    out = {"default": weights.DEFAULT.name, "weights": {}}
    for w in weights:
        metrics = w.meta.get("_metrics", {}).get("ImageNet-1K", {})
        out["weights"][w.name] = {"url": w.url, "acc@1": metrics.get("acc@1"), "acc@5": metrics.get("acc@5"),
                                  "num_params": w.meta.get("num_params"), "file_size_mb": w.meta.get("_file_size")}
    return out


def _timm_pretrained(timm, name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    keep = ("architecture", "tag", "hf_hub_id", "url", "input_size", "test_input_size", "crop_pct", "interpolation",
            "mean", "std", "license")
    return _plain({k: cfg.get(k) for k in keep})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "encoders")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = _load_recipe()
    torchvision, timm = _import_libraries()
    tv_version = torchvision.__version__.split("+")[0]
    args.out.mkdir(parents=True, exist_ok=True)

    for name in RESNETS + CONVNEXTS:
        is_resnet = name in RESNETS
        if is_resnet:
            model = getattr(torchvision.models, name)(weights=None).eval()
            shapes = _shapes(model, "fc.")
            source, pretrained = f"torchvision {tv_version}", _torchvision_pretrained(torchvision, name)
        else:
            model = timm.create_model(name, pretrained=False).eval()
            shapes = _shapes(model, "head.")
            source, pretrained = f"timm {timm.__version__}", _timm_pretrained(timm, name)
        sd = _load_recipe_weights(model, shapes, recipe)
        record = {"name": name, "source": source, "torch": str(torch.__version__), "recipe_seed": RECIPE_SEED,
                  "keys": [[k, list(s)] for k, s in shapes.items()],
                  "recipe_checksums": [[k, recipe.recipe_checksum(sd[k])] for k in shapes],
                  "pretrained": pretrained}
        notes = []
        with torch.no_grad():
            if is_resnet:
                x = recipe.recipe_input(RESNET_INPUT, seed=INPUT_SEED)
                feats = _resnet_features(model, x)
                # timm's ResNet has the same key names: same weights, same features.
                tm = timm.create_model(name, pretrained=False).eval()
                tm_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
                assert tm_shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}, name
                tm.load_state_dict(sd, strict=True)
                d = _max_diff(feats, tm.forward_intermediates(x, indices=5, intermediates_only=True))
                assert d <= 1e-5, (name, d)
                notes.append(f"timm forward_intermediates max|diff| {d:.2e}")
                strides = [2, 4, 8, 16, 32]
            else:
                x = recipe.recipe_input(CONVNEXT_INPUT, seed=INPUT_SEED)
                feats = model.forward_intermediates(x, intermediates_only=True)
                y, by_hand = model.stem(x), []
                for stage in model.stages:
                    y = stage(y)
                    by_hand.append(y)
                d1 = _max_diff(feats, by_hand)
                d2 = _max_diff(feats, _convnext_by_function(sd, x, [len(s.blocks) for s in model.stages]))
                assert d1 == 0.0 and d2 <= 1e-4, (name, d1, d2)
                notes.append(f"stem+stages by hand max|diff| {d1:.2e}, functional re-implementation {d2:.2e}")
                strides = [4, 8, 16, 32]
        for f, s in zip(feats, strides, strict=True):
            assert f.shape[-2:] == (math.ceil(x.shape[-2] / s), math.ceil(x.shape[-1] / s)), (name, f.shape, s)
            assert torch.isfinite(f).all(), name
        if name in WITH_FEATURES:
            record.update(input=_fixed(x), features=[_fixed(f) for f in feats], strides=strides)
        path = args.out / f"{name}.pt"
        torch.save(record, path)
        back = torch.load(path, weights_only=True)
        assert back["keys"] == record["keys"]
        mags = ", ".join(f"{tuple(f.shape[1:])} {float(f.abs().max()):.2f}" for f in feats)
        stored = "stored" if name in WITH_FEATURES else "not stored"
        print(f"{name}: {len(shapes)} keys, {path.stat().st_size} bytes; features ({stored}) max|.|: {mags}; "
              + "; ".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
