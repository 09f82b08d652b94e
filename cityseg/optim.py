"""Optimisation: the optimizer with its parameter groups, and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import TrainConfig


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """Poly decay from 1 to ``min_lr / lr``, ``(1 - it/max_iters) ** poly_power`` of the way, times a linear
    warmup from ``warmup_factor`` to 1 over the first ``warmup_iters``."""
    floor = cfg.min_lr / cfg.lr
    decay = floor + (1 - floor) * max(0.0, 1.0 - it / cfg.max_iters) ** cfg.poly_power
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        return decay * (cfg.warmup_factor * (1 - alpha) + alpha)
    return decay


def lr_scale(name: str, model: nn.Module, cfg: Any) -> float:
    """The learning rate of parameter ``name`` relative to ``--lr``: ``--encoder-lr-mult`` for the encoder's, times
    ``--layer-decay`` to the power of its stage's distance from the top (mmsegmentation's stage-wise rule: the
    top, ``num_layers + 1``, is the decoder's and the heads', which get the full rate)."""
    if not name.startswith("encoder."):
        return 1.0
    scale = cfg.encoder_lr_mult
    if cfg.layer_decay < 1.0:
        stage = model.encoder.stage_of(name[len("encoder."):])
        scale *= cfg.layer_decay ** (cfg.layer_decay_num_layers + 1 - stage)
    return scale


def param_groups(cfg: Any, model: nn.Module) -> list[dict[str, Any]]:
    """The parameters in groups of one learning-rate scale (:func:`lr_scale`) and weight decay each: 1-d
    parameters (norm weights, biases, layer scales) without weight decay under ``--no-decay-norm-bias``. The
    decoder's group with decay comes first: its learning rate is the one logged. ``cfg`` is a config or a saved
    one's fields (resuming rebuilds the groups a checkpoint was written with)."""
    groups: dict[tuple[bool, float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith("encoder."), -lr_scale(name, model, cfg), not cfg.decay_norm_bias and p.ndim <= 1)
            groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": -cfg.lr * neg_scale, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (_, neg_scale, no_decay), params in sorted(groups.items())]


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (the reference recipe) or AdamW, fused where the device has fused kernels.

    Fused optimizers also take the GradScaler's unscaling and inf check into their kernel; with any other
    implementation ``GradScaler.step`` reads the inf flag back to the host (a GPU sync) every fp16 step."""
    groups = param_groups(cfg, model)
    impl = {"fused": True} if fused_supported(device) else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                                 **impl)
    sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl)
    if impl.get("fused") and cfg.momentum:
        # Fused SGD creates its momentum buffers with empty_like on the first step and fills them in its kernel,
        # which returns early when the GradScaler found an inf: a skipped first fp16 step would leave garbage
        # for every later step. Zeros give the first real step the same buffer (momentum * 0 + gradient).
        for p in (p for g in groups for p in g["params"]):
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return sgd


def fused_supported(device: torch.device) -> bool:
    """Fused SGD and AdamW kernels exist for CUDA, and for the CPU from torch 2.4 on."""
    if device.type == "cuda":
        return True
    try:
        torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True
