"""Deterministic, library-free weights and inputs for the encoder reference fixtures.

The fixtures in ``tests/fixtures/encoders/`` hold the features that torchvision's ResNets and timm's ConvNeXt
compute with the weights made here; ``tools/make_encoder_fixtures.py`` wrote them and the tests remake the
same weights with this module (pure torch, no torchvision or timm) to check the project's own encoder ports.

``recipe_state_dict(shapes, seed)`` makes one tensor per key. Each key has its own ``torch.Generator``,
seeded with ``seed + zlib.crc32(key.encode())``, so a value does not depend on which other keys are asked
for or in what order. Rules, by key suffix and tensor rank (the first that matches):

- ``*num_batches_tracked``: a 0-d int64 zero.
- ``*running_mean``: ``0.1 * randn``.  ``*running_var``: ``0.5 + rand`` (in [0.5, 1.5), strictly positive).
- ``*gamma`` (ConvNeXt layer scale): ``0.5 + 0.5 * rand``, in [0.5, 1): neither 1 nor ~0, so a port that
  drops or mis-applies layer scale fails.
- ``*weight`` of rank >= 2 (conv, linear, depthwise conv): ``randn * sqrt(2 / fan_in)`` with
  ``fan_in = prod(shape[1:])`` (He; a depthwise ``(C, 1, k, k)`` kernel has ``fan_in = k * k``).
- ``*weight`` of rank 1 (BatchNorm, LayerNorm): ``1 + 0.1 * randn``; times ``RESIDUAL_BN_SCALE`` (0.25) for
  the last BatchNorm of a ResNet residual branch (a ``layerN.M.bnK`` whose block has no ``bnK+1``: ``bn3`` of
  a bottleneck, ``bn2`` of a basic block), which keeps a ResNet's features from growing ~2x in variance per
  block (resnet101's layer4 would reach ~1e6 without it).
- ``*bias``: ``0.1 * randn``.
- Then, for ``stem.0.*`` and ``*conv_dw.*`` (the convs whose output a ConvNeXt LayerNorm normalizes):
  times ``LN_INPUT_SCALE`` (1e-3), so that those LayerNorms see a variance of the order of their eps (1e-6)
  and a port with another eps (``nn.LayerNorm``'s default 1e-5) is off by ~10-50%, not ~1e-5. The
  normalization brings the values straight back to O(1).

Any other key raises ``ValueError``. All floating tensors are float32. In eval mode these weights keep the
features of resnet18/34/50/101 and convnext_tiny/small finite and moderate (max-abs up to ~40; the fixtures'
generator prints them). ``recipe_input(shape, seed)`` is ``torch.randn(shape)`` from a generator seeded with
``seed``.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

RESIDUAL_BN_SCALE = 0.25
LN_INPUT_SCALE = 1e-3

_RESNET_BN = re.compile(r"^(layer\d+\.\d+\.)bn(\d+)\.weight$")


def _generator(key: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))


def _is_last_residual_bn(key: str, shapes: dict) -> bool:
    m = _RESNET_BN.match(key)
    return bool(m) and f"{m.group(1)}bn{int(m.group(2)) + 1}.weight" not in shapes


def recipe_tensor(key: str, shape: tuple[int, ...], seed: int = 0, *, last_residual_bn: bool = False) -> torch.Tensor:
    """The recipe's tensor for one key (see the module docstring); ``last_residual_bn`` scales a norm weight."""
    t = _base_tensor(key, tuple(int(s) for s in shape), seed, last_residual_bn)
    if key.startswith("stem.0.") or ".conv_dw." in key or key.startswith("conv_dw."):
        t = t * LN_INPUT_SCALE
    return t


def _base_tensor(key: str, shape: tuple[int, ...], seed: int, last_residual_bn: bool) -> torch.Tensor:
    g = _generator(key, seed)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key.endswith("gamma"):
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if key.endswith("weight") and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
    if key.endswith("weight") and len(shape) == 1:
        w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        return w * RESIDUAL_BN_SCALE if last_residual_bn else w
    if key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    raise ValueError(f"encoder recipe has no rule for {key!r} of shape {shape}")


def recipe_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """One recipe tensor per ``key -> shape`` of ``shapes`` (a dict, or ``[key, shape]`` pairs), in its order."""
    shapes = dict((k, tuple(s)) for k, s in (shapes.items() if isinstance(shapes, dict) else shapes))
    return {k: recipe_tensor(k, s, seed, last_residual_bn=_is_last_residual_bn(k, shapes)) for k, s in shapes.items()}


def recipe_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 ``randn`` input of ``shape`` from a generator seeded with ``seed``."""
    return torch.randn(tuple(int(s) for s in shape), generator=torch.Generator().manual_seed(seed))


def recipe_checksum(t: torch.Tensor) -> float:
    """The exact (``math.fsum``) sum of about 1024 evenly strided values of ``t``.

    The fixtures store one per key, so that a test can tell a recipe that no longer reproduces (a changed RNG
    or rule) from a wrong port. Exact and independent of torch's thread count: compare with ``==``.
    """
    flat = t.detach().reshape(-1)
    return math.fsum(flat[:: max(1, flat.numel() // 1024)].double().tolist())
