"""What a resumed run may change: every field of the config either takes effect from the resumed step or is
refused in one line naming the field and the value the run was started with. No value is recorded (config.yaml,
W&B, the log) that is not in force.

Refused:

- what shapes the checkpoint's tensors: ``--model`` and its options (``--width``, ``--decoder-channels``), and
  whether there is an auxiliary head (``--aux-weight`` zero or not);
- ``--optimizer``: SGD's momentum buffers are not AdamW's moments;
- ``--seed``: the order of the samples and the augmentation of the epoch in progress follow from it;
- ``--init-from`` and ``--encoder-weights``: read when a run starts, never again;
- ``--ema-decay 0`` when the checkpoint holds a moving average, which would be dropped from every later
  checkpoint.

Everything else takes effect from the resumed step. The optimizer's hyper-parameters (``--lr``, ``--momentum``,
``--weight-decay``, ``--encoder-lr-mult``, ``--layer-decay``, ``--no-decay-norm-bias``) are set in its parameter
groups, rebuilt from the current config, with each parameter's saved state (momentum, moments) carried over,
and the learning rate scaled as the schedule (itself read from the current config) says at the resumed step.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import CheckpointError
from .config import TrainConfig, flag
from .models import model_options
from .optim import lr_factor, param_groups

#: Fields whose change is refused, and why (the end of the one line).
REFUSED = {
    "model": "the checkpoint holds that model's weights",
    "optimizer": "the checkpoint's optimizer state belongs to that optimizer",
    "seed": "the order of the samples and the augmentation of the epoch in progress follow from it",
    "init_from": "it is read when a run starts; a resumed run continues from its checkpoint",
    "encoder_weights": "it is read when a run starts; a resumed run continues from its checkpoint",
}


def saved_config(saved: dict[str, Any]) -> types.SimpleNamespace:
    """A checkpoint's config with today's defaults for the fields it predates (attribute access)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return types.SimpleNamespace(**{**defaults, **saved})


def check_resume(saved: dict[str, Any], cfg: TrainConfig, path: Path, has_ema: bool) -> list[str]:
    """Refuse what may not change since the checkpoint (one :class:`CheckpointError` line); return the changed
    fields, which take effect."""
    old, new = vars(saved_config(saved)), cfg.to_dict()
    if old.get("model", "unet") != new["model"]:  # checkpoints older than --model hold the classic U-Net
        _refuse(path, "model", old["model"], new["model"], REFUSED["model"])
    for name in (*model_options(new["model"]), *REFUSED):
        if old[name] != new[name]:
            _refuse(path, name, old[name], new[name], REFUSED.get(name, "the checkpoint's weights have that shape"))
    if (old["aux_weight"] > 0) != (new["aux_weight"] > 0):  # the auxiliary head's weights
        _refuse(path, "aux_weight", old["aux_weight"], new["aux_weight"],
                "the auxiliary head exists only when it is non-zero; keep it zero or non-zero as it was")
    if has_ema and not new["ema_decay"]:
        _refuse(path, "ema_decay", old["ema_decay"], new["ema_decay"],
                f"the checkpoint holds a moving average of the weights, which 0 would drop; pass "
                f"{flag('ema_decay')} {old['ema_decay']:g} (or another non-zero decay) to keep it")
    return [k for k in new if old.get(k) != new[k]]


def _refuse(path: Path, name: str, old: Any, new: Any, why: str) -> None:
    raise CheckpointError(f"{flag(name)}: this run was started with {flag(name)} {_show(old)} (in {path}) and "
                          f"cannot resume with {_show(new)}: {why}. Use the same value, or a new --out-dir to start "
                          f"a fresh run.", collective=True)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) and (not value or " " in value) else f"{value}"


def load_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], cfg: TrainConfig,
                   model: nn.Module) -> None:
    """Continue the checkpoint's optimizer and schedule under the current config: each parameter keeps its saved
    state (momentum buffer, moments, step), every group gets the current hyper-parameters, and the learning rate
    is the current ``--lr`` (times the group's multiplier) at the schedule's factor for the resumed step."""
    saved = state["optimizer"]
    layout = [group["params"] for group in param_groups(saved_config(state["config"]), model)]
    if [len(g) for g in layout] != [len(g["params"]) for g in saved["param_groups"]]:
        raise CheckpointError(f"the optimizer state in the checkpoint does not match this model's parameters "
                              f"({len(saved['param_groups'])} groups); it was written by another version or "
                              f"edited.", collective=True)
    saved_index = [i for g in saved["param_groups"] for i in g["params"]]
    state_of = {id(p): saved["state"][i] for p, i in zip((p for g in layout for p in g), saved_index)
                if i in saved["state"]}
    new_index = {id(p): j for j, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    it = int(state["scheduler"]["last_epoch"])
    groups = []
    for g in optimizer.param_groups:
        base = g["initial_lr"]
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "lr": base * lr_factor(it, cfg),
                       "params": [new_index[id(p)] for p in g["params"]]})
    optimizer.load_state_dict({"state": {new_index[k]: v for k, v in state_of.items()}, "param_groups": groups})
    for p, kept in optimizer.state.items():  # CUDA's fused kernels want each buffer in its parameter's layout
        for k, v in kept.items():  # (a checkpoint of an NCHW run, or of another device, saved other strides)
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                kept[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    scheduler.load_state_dict({**state["scheduler"], "base_lrs": [g["initial_lr"] for g in optimizer.param_groups],
                               "_last_lr": [g["lr"] for g in optimizer.param_groups]})
