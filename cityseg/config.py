"""One typed training config: every field is a ``--flag``; ``--config recipe.yaml`` sets defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError):
    """A config value or file a user supplied is wrong; the message says which and what to do."""


def option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A dataclass field carrying its --help text and allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def check_choices(cfg: Any) -> None:
    """Every field declared with ``choices`` holds one of them."""
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                              f"got {getattr(cfg, f.name)!r}.")


def parse_hw(text: str, name: str = "--crop-size") -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``512x1024``) into ``(H, W)``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise ConfigError(f"{name} must look like HxW with positive integers (e.g. 512x1024), got {text!r}.")
    return int(m.group(1)), int(m.group(2))


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the reference Cityscapes recipe."""

    # data
    data_root: str = option("", "Cityscapes root (holding leftImg8bit/ and gtFine/, or the *_trainvaltest wrappers).")
    train_split: str = option("train", "Split to train on.")
    val_split: str = option("val", "Split evaluated every --eval-every iterations.")
    cache_dir: str = option("", "Decoded memory-mapped cache from `python -m cityseg.prepare`, used for the "
                                "splits it holds; empty = DATA_ROOT/cityseg_cache, none = always read PNGs.")
    crop_size: str = option("512x1024", "Training crop as HxW.")
    scale_min: float = option(0.5, "Smallest random rescale factor of the training augmentation.")
    scale_max: float = option(2.0, "Largest random rescale factor of the training augmentation.")
    batch_size: int = option(4, "Training images per process (the global batch is this times the world size).")
    workers: int = option(4, "DataLoader worker processes per training process (0 loads in the main process).")
    # model
    width: int = option(64, "U-Net base width; 64 gives the classic 31M-parameter net.")
    # optimisation
    max_iters: int = option(160_000, "Total training iterations (optimizer steps).")
    accum_steps: int = option(1, "Micro-batches per optimizer step (gradient accumulation; DDP all-reduces "
                                 "only on the last). The global batch is batch-size x processes x accum-steps.")
    compile: bool = option(False, "torch.compile the model (slower start, faster steps on GPUs).")
    optimizer: str = option("sgd", "Optimizer.", ("sgd", "adamw"))
    lr: float = option(0.01, "Peak learning rate, reached after warmup and then decayed by the poly schedule.")
    momentum: float = option(0.9, "SGD momentum (AdamW beta1 is fixed at 0.9).")
    weight_decay: float = option(5e-4, "Weight decay.")
    warmup_iters: int = option(1000, "Iterations of linear learning-rate warmup from lr * warmup_factor.")
    warmup_factor: float = option(0.1, "Learning-rate multiplier at iteration 0 of the warmup.")
    poly_power: float = option(0.9, "Exponent of the poly decay lr * (1 - it / max_iters) ** power.")
    amp: str = option("auto", "Mixed precision; auto = bf16 on CUDA where supported, off on CPU.",
                  ("auto", "bf16", "fp16", "off"))
    # run
    out_dir: str = option("runs/cityseg", "Run directory: checkpoints, logs, config; an existing last.pt is resumed.")
    seed: int = option(0, "Seed of sample order, augmentation and initialisation.")
    device: str = option("auto", "Device type; auto = cuda when available.", ("auto", "cuda", "cpu"))
    eval_every: int = option(4000, "Evaluate on --val-split every N iterations (0 = only at the end).")
    ckpt_every: int = option(1000, "Write OUT/ckpt_<iteration>.pt (and point OUT/last.pt at it) every N "
                                   "iterations, at the end and when stopped by a signal.")
    keep_ckpts: int = option(2, "Keep the newest N periodic checkpoints (best.pt is kept besides).")
    log_every: int = option(20, "Log loss, lr and throughput every N iterations (the only host syncs of the loop).")
    max_val_images: int = option(0, "Evaluate at most this many val images during training (0 = all).")
    num_pictures: int = option(4, "At each evaluation, write (and log to W&B) prediction panels of the first N "
                                  "val images, the per-class IoU bars and the confusion matrix (0 = none).")
    # tracking
    wandb: str = option("auto", "Weights & Biases; auto = online when logged in, otherwise offline.",
                    ("auto", "online", "offline", "off"))
    wandb_project: str = option("cityseg", "W&B project.")
    wandb_entity: str = option("", "W&B entity (team or user); empty uses your default.")
    run_name: str = option("", "Run name shown in W&B; empty uses the out dir's name.")

    def __post_init__(self) -> None:
        parse_hw(self.crop_size)
        for name in ("batch_size", "width", "max_iters", "log_every", "keep_ckpts", "accum_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        for name in ("workers", "eval_every", "ckpt_every", "warmup_iters", "max_val_images", "num_pictures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}.")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("--scale-min must be positive and at most --scale-max.")
        check_choices(self)

    @property
    def crop_hw(self) -> tuple[int, int]:
        """The crop size as ``(H, W)``."""
        return parse_hw(self.crop_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the config (what goes into checkpoints, config.yaml and W&B)."""
        return dataclasses.asdict(self)


def load_yaml(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a recipe; every key must be a field of ``cls``."""
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path.name).is_file() and not path.parent.name:
        path = CONFIG_DIR / path.name  # allow `--config demo.yaml` for the shipped recipes
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a YAML recipe such as cityseg/configs/demo.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value at the top level.")
    return check_keys(data, cls, str(path))


def check_keys(data: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    """Normalise dashes to underscores and reject keys that are not fields of ``cls``."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are the --flags "
                          f"of --help with dashes as underscores.")
    for name, value in data.items():
        kind = _arg_type(known[name])
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            data[name], ok = float(value), True
        if not ok:
            raise ConfigError(f"{source}: {name} must be a {kind.__name__}, got {value!r}.")
    return data


def _arg_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def build_parser(cls: type = TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per field of ``cls``; unset flags are absent from the result."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     usage="%(prog)s [--config YAML] [--flag VALUE ...] (all flags: --help)",
                                     argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="Recipe whose values replace the defaults; "
                        "flags given on the command line override it.")
    for f in fields(cls):
        kind = _arg_type(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=help_text,
                                metavar=f.name.upper() if not f.metadata.get("choices") else None)
    return parser


def parse_config(argv: Sequence[str] | None = None, cls: type = TrainConfig) -> Any:
    """Defaults < ``--config`` recipe < command-line flags; a bad value raises :class:`ConfigError`."""
    args = vars(build_parser(cls).parse_args(argv))
    values: dict[str, Any] = {}
    recipe = args.pop("config", None)
    if recipe:
        values.update(load_yaml(recipe, cls))
    values.update(args)
    return cls(**values)


def from_dict(data: dict[str, Any], cls: type = TrainConfig) -> Any:
    """Rebuild a config saved with ``to_dict`` (keys unknown to this version are errors)."""
    return cls(**check_keys(dict(data), cls, "saved config"))


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to the run."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
