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


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """The parameters in up to four groups: the encoder's (at ``--encoder-lr-mult`` times the learning rate)
    and the rest, each split into 1-d parameters (norm weights, biases, layer scales) without weight decay
    under ``--no-decay-norm-bias`` and the others. The group of the rest with decay comes first: its learning
    rate is the one logged."""
    encoder = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in encoder, not cfg.decay_norm_bias and p.ndim <= 1), []).append(p)
    return [{"params": params, "lr": cfg.lr * (cfg.encoder_lr_mult if in_encoder else 1.0),
             "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (in_encoder, no_decay), params in sorted(groups.items())]


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
