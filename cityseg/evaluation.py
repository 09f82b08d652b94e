"""Evaluation: the loop shared by evaluate.py and training, and the evaluate.py job itself."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as du
from .config import ConfigError, from_dict, option
from .data import CityscapesDataset, ShardSampler, make_loader
from .labels import NUM_CLASSES
from .metrics import ConfusionMatrix, format_table
from .model import build_model
from .transforms import to_input, to_target


@dataclass
class EvalConfig:
    """Evaluate a checkpoint on a Cityscapes split at full resolution."""

    checkpoint: str = option("", "Checkpoint to evaluate (a last.pt or best.pt written by train.py).")
    data_root: str = option("", "Cityscapes root (holding leftImg8bit/ and gtFine/, or the *_trainvaltest wrappers).")
    split: str = option("val", "Split to evaluate.")
    out_dir: str = option("", "Where metrics.json goes; empty = the checkpoint's directory.")
    workers: int = option(4, "DataLoader worker processes per process.")
    device: str = option("auto", "Device type; auto = cuda when available.", ("auto", "cuda", "cpu"))
    amp: str = option("auto", "Mixed precision; auto = bf16 on CUDA where supported, off on CPU.",
                  ("auto", "bf16", "fp16", "off"))
    max_images: int = option(0, "Evaluate at most this many images (0 = all).")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}.")
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required: pass the last.pt or best.pt of a training run.")
        if not self.data_root:
            raise ConfigError("--data-root is required: pass your Cityscapes root.")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (None = full precision)."""
    if amp == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or nothing when running in full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, dtype: torch.dtype | None = None,
             channels_last: bool = False, num_classes: int = NUM_CLASSES) -> ConfusionMatrix:
    """Confusion matrix of ``model`` (unwrapped, not DDP) over this rank's shard, all-reduced over ranks."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device)
    for images, labels, _ in loader:
        with autocast(device, dtype):
            logits = model(to_input(images, device, channels_last))
        cm.update(logits.argmax(1), to_target(labels, device))
    model.train(was_training)
    return cm.all_reduce()


def val_loader(root: str, split: str, ctx: du.DistContext, workers: int, limit: int = 0):
    """Full-resolution, unaugmented loader over this rank's shard of ``split`` (each image exactly once)."""
    dataset = CityscapesDataset(root, split)
    sampler = ShardSampler(len(dataset), ctx.world_size, ctx.rank, limit)
    return make_loader(dataset, sampler, 1, workers, pin=ctx.device.type == "cuda"), dataset


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Build the U-Net a checkpoint describes and load its weights."""
    state = ckpt.load(path)
    width = from_dict(state["config"]).width if "config" in state else None
    if width is None:
        raise ckpt.CheckpointError(f"{path}: has no saved config; it was not written by cityseg's train.py.")
    model = build_model(width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: weights do not fit a width-{width} U-Net ({e}).") from e
    return model.to(device), state


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_evaluation(cfg: EvalConfig) -> dict[str, Any] | None:
    """The evaluate.py job: shard the split over ranks, all-reduce once, report on rank 0."""
    with du.session(cfg.device) as ctx:
        model, state = load_model(cfg.checkpoint, ctx.device)
        loader, dataset = val_loader(cfg.data_root, cfg.split, ctx, cfg.workers, cfg.max_images)
        cm = evaluate(model, loader, ctx.device, amp_dtype(cfg.amp, ctx.device))
        if not ctx.is_main:
            return None
        result = cm.compute()
        result.update(split=cfg.split, checkpoint=str(cfg.checkpoint), iteration=state.get("iteration"),
                      num_images=min(len(dataset), cfg.max_images or len(dataset)))
        out = Path(cfg.out_dir or Path(cfg.checkpoint).parent)
        out.mkdir(parents=True, exist_ok=True)
        write_json(result, out / "metrics.json")
        print(format_table(result))
        print(f"{cfg.split}: mIoU {_fmt(result['miou'])} over {result['num_images']} images "
              f"({ctx.world_size} process{'es' if ctx.world_size > 1 else ''}); wrote {out / 'metrics.json'}")
        return result


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
