"""The typed configs of train.py and evaluate.py: every field is a ``--flag``; ``--config recipe.yaml`` sets
defaults. Every value is checked here, where it is parsed: a bad one is one line, ``--flag: got X; allowed``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .errors import UserError, speaks
from .losses import LOSSES
from .models import MODELS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MIN_SIDE = 16  # the U-Net pools four times; inputs of other sizes are padded to a multiple of 16

#: ``check(value)`` returns what is allowed when ``value`` is bad, None when it is fine.
Check = Callable[[Any], "str | None"]


class ConfigError(UserError):
    """A config value or file a user supplied is wrong; the message says which and what to do. Every rank
    parses the same flags, so every rank raises it and rank 0 prints it."""

    collective = True

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def flag(name: str) -> str:
    """``--crop-size`` for the field ``crop_size``."""
    return "--" + name.replace("_", "-")


def bad(name: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error for a bad value of field ``name``."""
    return ConfigError(f"{flag(name)}: got {value!r}; {allowed}", field=name)


def option(default: Any, help: str, choices: Sequence[str] | None = None, check: Check | None = None,
           path: bool = False) -> Any:
    """A dataclass field carrying its --help text, allowed values and check; ``path`` fields get ``~`` expanded."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "path": path})


# -- checks ----------------------------------------------------------------------------------------------
def integer(low: int, high: int | None = None) -> Check:
    """An integer in ``[low, high]``."""
    allowed = f"must be an integer >= {low}" if high is None else f"must be an integer from {low} to {high}"
    return lambda v: None if v >= low and (high is None or v <= high) else allowed


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number between ``low`` and ``high`` (each end included unless open)."""
    if high == math.inf:
        allowed = f"must be a finite number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v: float) -> str | None:
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else allowed
    return check


def nonempty(v: str) -> str | None:
    """Any text but the empty one."""
    return None if v.strip() else "must not be empty"


def split_name(v: str) -> str | None:
    """A Cityscapes split's folder name."""
    return None if re.fullmatch(r"[\w.-]+", v) else "must be a split name such as train or val"


def parse_hw(text: str, min_side: int = 1) -> tuple[int, int] | None:
    """``"HxW"`` (e.g. ``512x1024``) as ``(H, W)``; None unless both sides are integers >= ``min_side``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or min(int(m.group(1)), int(m.group(2))) < min_side:
        return None
    return int(m.group(1)), int(m.group(2))


def hw(min_side: int) -> Check:
    """``HxW`` with both sides at least ``min_side``."""
    padded = f" (sides that are not multiples of {MIN_SIDE} are padded and cropped back)" if min_side > 1 else ""
    allowed = f"must look like HxW with integer sides of at least {min_side}, e.g. 512x1024{padded}"
    return lambda v: None if parse_hw(v, min_side) else allowed


def int_list(text: str, length: int) -> tuple[int, ...] | None:
    """``"256,128,64"`` as positive integers; None unless there are ``length`` of them."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != length or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    return tuple(int(p) for p in parts)


def scale_list(text: str) -> tuple[float, ...] | None:
    """``"0.75,1.0,1.5"`` as floats; None unless each is a number in (0, 4]."""
    try:
        values = tuple(float(s) for s in text.split(","))
    except ValueError:
        return None
    return values if values and all(math.isfinite(v) and 0 < v <= 4 for v in values) else None


# -- the configs -----------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the reference Cityscapes recipe.

    Recipes choose their values from published practice (mmsegmentation, torchvision's references, the model's
    authors), never from a score on the synthetic tree: the synthetic tree tests code paths, not recipes."""

    REQUIRED = {"data_root": "/path/to/cityscapes"}  # field: an example value

    # data
    data_root: str = option("", "Cityscapes root (holding leftImg8bit/ and gtFine/, or the *_trainvaltest "
                                "wrappers); required.", path=True)
    train_split: str = option("train", "Split to train on.", check=split_name)
    val_split: str = option("val", "Split evaluated every --eval-every iterations.", check=split_name)
    cache_dir: str = option("", "Decoded memory-mapped cache from `python -m cityseg.prepare`: empty = "
                                "DATA_ROOT/cityseg_cache when it holds the training split, else PNGs; a directory "
                                "= that cache, which must hold the training split; none = always read PNGs.",
                            path=True)
    crop_size: str = option("512x1024", f"Training crop as HxW, each side at least {MIN_SIDE}; sides that are not "
                                        f"multiples of {MIN_SIDE} are padded inside the U-Net and cropped back.",
                            check=hw(MIN_SIDE))
    scale_min: float = option(0.5, "Smallest random rescale factor of the training augmentation.",
                              check=number(0, 8, low_open=True))
    scale_max: float = option(2.0, "Largest random rescale factor of the training augmentation.",
                              check=number(0, 8, low_open=True))
    cat_max_ratio: float = option(1.0, "Retry the random crop (up to 10 windows) until no class covers more than "
                                       "this fraction of its labelled pixels; 1 = off (mmsegmentation's "
                                       "cat_max_ratio).", check=number(0, 1, low_open=True))
    photometric: str = option("mild", "Photometric augmentation: none; mild (brightness and contrast +-20%, "
                                      "half the time); full (mmsegmentation's PhotoMetricDistortion ranges: "
                                      "brightness +-32, contrast, saturation 0.5-1.5, hue +-18).",
                              ("none", "mild", "full"))
    batch_size: int = option(4, "Training images per process (the global batch is this times the world size).",
                             check=integer(1))
    workers: int = option(4, "DataLoader worker processes per training process (0 loads in the main process).",
                          check=integer(0))
    # model
    model: str = option("unet", "Model, by name: unet (the classic U-Net, trained from scratch; --width) or "
                                "unet_<encoder>, a U-Net decoder on an ImageNet-pretrained encoder (resnet18, "
                                "resnet34, resnet50, resnet101, convnext_tiny, convnext_small; --encoder-weights, "
                                "--decoder-channels).", tuple(MODELS))
    width: int = option(64, "Base width of the classic U-Net (--model unet); 64 gives its 31M-parameter net.",
                        check=integer(1))
    decoder_channels: str = option("256,128,64,32,16", "Widths of the 5 decoder stages of the unet_<encoder> "
                                                       "models, from stride 16 to full resolution.",
                                   check=lambda v: None if int_list(v, 5) else "must be 5 positive integers "
                                                                                 "separated by commas")
    encoder_weights: str = option("imagenet", "Encoder weights of the unet_<encoder> models when a run starts: "
                                              "imagenet (the official ImageNet file, fetched once into torch.hub's "
                                              "cache, $TORCH_HOME, and hash-checked), none (random), or the path of "
                                              "a torchvision .pth or timm .safetensors/.bin file.", check=nonempty,
                                  path=True)
    init_from: str = option("", "Start a new run from the model weights of this checkpoint (cityseg's, or a state "
                                "dict of the same model); a run directory with a checkpoint resumes instead.",
                            path=True)
    aux_weight: float = option(0.0, "Weight of the auxiliary head's cross-entropy (a 1x1 conv on a decoder stage: "
                                    "the classic U-Net's half-resolution one, the encoder U-Nets' stride-8 one; "
                                    "training only); 0 = no auxiliary head.",
                               check=number(0))
    # loss
    loss: str = option("ce", "Loss of the main head: ce (cross-entropy over the labelled pixels) or ohem "
                             "(only the hard pixels, chosen over the global batch).", tuple(LOSSES))
    ohem_thresh: float = option(0.7, "OHEM: keep the pixels whose probability for their true class is below this.",
                                check=number(0, 1, low_open=True))
    ohem_min_kept: int = option(100_000, "OHEM: but keep at least this many pixels per image of the global batch "
                                         "(the hardest ones).", check=integer(0))
    # optimisation
    max_iters: int = option(160_000, "Total training iterations (optimizer steps).", check=integer(1))
    accum_steps: int = option(1, "Micro-batches per optimizer step (gradient accumulation; DDP all-reduces "
                                 "only on the last). The global batch is batch-size x processes x accum-steps.",
                              check=integer(1))
    compile: bool = option(False, "torch.compile the model (slower start, faster steps on GPUs).")
    deterministic: bool = option(False, "Deterministic GPU kernels (cuDNN's deterministic algorithms, no "
                                        "autotuning), so that a resumed CUDA run repeats an uninterrupted one "
                                        "bit for bit; slower. CPU runs are deterministic anyway.")
    optimizer: str = option("sgd", "Optimizer.", ("sgd", "adamw"))
    lr: float = option(0.01, "Peak learning rate, reached after warmup and then decayed by the poly schedule.",
                       check=number(0, low_open=True))
    min_lr: float = option(0.0, "Learning rate the poly decay ends at (mmsegmentation's eta_min); at most --lr.",
                           check=number(0))
    momentum: float = option(0.9, "SGD momentum (AdamW beta1).", check=number(0, 1, high_open=True))
    weight_decay: float = option(5e-4, "Weight decay.", check=number(0))
    decay_norm_bias: bool = option(True, "Weight decay on 1-d parameters too (norm weights, biases, ConvNeXt's layer "
                                         "scales); --no-decay-norm-bias exempts them, as ConvNeXt and most AdamW "
                                         "recipes do.")
    encoder_lr_mult: float = option(1.0, "Learning rate of the encoder's parameters relative to --lr (the "
                                         "unet_<encoder> models; 0.1 is common for pretrained encoders).",
                                    check=number(0))
    layer_decay: float = option(1.0, "Layer-wise learning-rate decay of the unet_<encoder> models, by stage "
                                     "(mmsegmentation's stage_wise LearningRateDecayOptimizerConstructor): the "
                                     "decoder and heads get the full rate, the encoder's stage i (stem 0; "
                                     "ConvNeXt's downsampling layers 0 too; blocks of stage N or ResNet's layerN: N "
                                     "+ 1 or N) RATE ** (num_layers + 1 - i), times --encoder-lr-mult; 1 = off.",
                                check=number(0, 1, low_open=True))
    layer_decay_num_layers: int = option(6, "mmsegmentation's num_layers of --layer-decay (ConvNeXt-T's recipe "
                                            "uses 6, ConvNeXt-S and -B 12): the exponent's top is num_layers + 1.",
                                         check=integer(4))
    drop_path: float = option(0.0, "Stochastic depth of the unet_<encoder> models (timm's semantics): in training "
                                   "each sample's residual branch is dropped with a probability rising linearly "
                                   "from 0 at the encoder's first block to this at its last; none in evaluation.",
                              check=number(0, 1, high_open=True))
    ema_decay: float = option(0.0, "Keep an exponential moving average of the weights, this much of the old one "
                                   "kept each step (e.g. 0.9999; 0 = off). It is evaluated during training, saved "
                                   "in every checkpoint, and evaluate.py uses it.",
                              check=number(0, 1, high_open=True))
    warmup_iters: int = option(1000, "Iterations of linear learning-rate warmup from lr * warmup_factor.",
                               check=integer(0))
    warmup_factor: float = option(0.1, "Learning-rate multiplier at iteration 0 of the warmup.",
                                  check=number(0, 1))
    poly_power: float = option(0.9, "Exponent of the poly decay (1 - it / max_iters) ** power.", check=number(0))
    amp: str = option("auto", "Mixed precision; auto = bf16 on GPUs with bf16 units (compute capability 8.0+), "
                              "fp16 with a GradScaler on older GPUs, off on CPU.",
                      ("auto", "bf16", "fp16", "off"))
    # run
    out_dir: str = option("runs/cityseg", "Run directory: checkpoints, logs, config; an existing last.pt is "
                                          "resumed. One run at a time owns it (OUT/run.lock).", check=nonempty,
                          path=True)
    seed: int = option(0, "Seed of sample order, augmentation and initialisation.", check=integer(0, 2**32 - 1))
    device: str = option("auto", "Device type; auto = cuda when available.", ("auto", "cuda", "cpu"))
    eval_every: int = option(4000, "Evaluate on --val-split every N iterations (0 = only at the end).",
                             check=integer(0))
    ckpt_every: int = option(1000, "Write OUT/ckpt_<iteration>.pt (and point OUT/last.pt at it) every N "
                                   "iterations, at the end and when stopped by a signal (0 = only then).",
                             check=integer(0))
    keep_ckpts: int = option(2, "Keep the newest N periodic checkpoints (best.pt is kept besides).",
                             check=integer(1))
    log_every: int = option(20, "Log loss, lr and throughput every N iterations (the only host syncs of the "
                                "loop).", check=integer(1))
    stall_timeout: float = option(600.0, "Stall watchdog: when no rank has completed a step or an evaluation batch for "
                                         "this many seconds (a hung file system, a stopped or deadlocked process), "
                                         "every live rank writes its Python stacks to OUT/stalls/, one line names "
                                         "the ranks that stopped, and the job exits with status 75 (requeued under "
                                         "SLURM) to resume from its last checkpoint. The first step and checkpoint "
                                         "writes are not watched. 0 = off.", check=number(0))
    max_val_images: int = option(0, "Evaluate at most this many val images during training (0 = all).",
                                 check=integer(0))
    num_pictures: int = option(4, "At each evaluation, write (and log to W&B) prediction panels of the first N "
                                  "val images, the per-class IoU bars and the confusion matrix (0 = none).",
                               check=integer(0))
    # tracking
    wandb: str = option("auto", "Weights & Biases; auto = online when logged in, otherwise offline.",
                        ("auto", "online", "offline", "off"))
    wandb_project: str = option("cityseg", "W&B project.", check=nonempty)
    wandb_entity: str = option("", "W&B entity (team or user); empty uses your default.")
    run_name: str = option("", "Run name shown in W&B; empty uses the out dir's name.")

    def __post_init__(self) -> None:
        validate(self)
        if self.scale_min > self.scale_max:
            raise bad("scale_min", self.scale_min, f"must be at most --scale-max ({self.scale_max:g})")
        if self.min_lr > self.lr:
            raise bad("min_lr", self.min_lr, f"must be at most --lr ({self.lr:g})")

    @property
    def crop_hw(self) -> tuple[int, int]:
        """The crop size as ``(H, W)``."""
        return parse_hw(self.crop_size, MIN_SIDE)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the config (what goes into checkpoints, config.yaml and W&B)."""
        return dataclasses.asdict(self)

    @property
    def encoder(self) -> str | None:
        """The pretrained encoder of ``--model``, if it has one."""
        return MODELS[self.model].encoder


@dataclass
class EvalConfig:
    """Evaluate a checkpoint on a Cityscapes split at full resolution (or predict your own images)."""

    REQUIRED = {"checkpoint": "runs/unet/best.pt"}

    checkpoint: str = option("", "Checkpoint to evaluate (a last.pt or best.pt written by train.py); required.",
                             path=True)
    data_root: str = option("", "Cityscapes root (holding leftImg8bit/ and gtFine/, or the *_trainvaltest "
                                "wrappers).", path=True)
    split: str = option("val", "Split to evaluate; test has no public labels, so it is export-only.",
                        check=split_name)
    out_dir: str = option("", "Where metrics.json and pictures go; empty = the checkpoint's directory (the file "
                              "names never collide with a training run's).", path=True)
    workers: int = option(4, "DataLoader worker processes per process.", check=integer(0))
    device: str = option("auto", "Device type; auto = cuda when available.", ("auto", "cuda", "cpu"))
    amp: str = option("auto", "Mixed precision; auto = bf16 on GPUs with bf16 units (compute capability 8.0+), "
                              "fp16 with a GradScaler on older GPUs, off on CPU.",
                      ("auto", "bf16", "fp16", "off"))
    max_images: int = option(0, "Evaluate at most this many images (0 = all).", check=integer(0))
    mode: str = option("whole", "Inference on the whole image, or in sliding windows.", ("whole", "slide"))
    window: str = option("512x1024", f"Sliding window size HxW (--mode slide), each side at least {MIN_SIDE} and "
                                     "at most the image's (with --images, windows larger than an image are clipped "
                                     "to it).", check=hw(MIN_SIDE))
    stride: str = option("341x683", "Sliding window stride HxW (--mode slide), at most the window on each side; "
                                    "overlapping logits are averaged.", check=hw(1))
    tta: str = option("none", "Test-time augmentation: average with the horizontally flipped image.",
                      ("none", "flip"))
    scales: str = option("1.0", "Comma-separated image scales in (0, 4] whose predictions are averaged, e.g. "
                                "0.75,1.0,1.25,1.5,1.75.",
                         check=lambda v: None if scale_list(v) else "must be numbers in (0, 4] separated by commas")
    export_dir: str = option("", "Write one labelId PNG per image here, in the official Cityscapes format.",
                             path=True)
    official: bool = option(False, "Also run cityscapesscripts' evalPixelLevelSemanticLabeling on the exported "
                                   "predictions (into --export-dir, or OUT/predictions) and report both.")
    num_pictures: int = option(4, "Write image|ground truth|prediction|errors panels for the first N images.",
                               check=integer(0))
    images: str = option("", "Predict these images instead (a directory, or a glob where ** spans folders) and "
                             "write colour overlays under OUT/overlays, keeping their relative paths.", path=True)
    use_ema: str = option("auto", "Evaluate the checkpoint's moving average of the weights (--ema-decay): auto = "
                                  "when it has one; yes (an error without one); no = the raw weights.",
                          ("auto", "yes", "no"))
    wandb: str = option("off", "Log metrics and pictures to Weights & Biases.", ("off", "auto", "online", "offline"))
    wandb_project: str = option("cityseg", "W&B project.", check=nonempty)
    wandb_entity: str = option("", "W&B entity (team or user); empty uses your default.")

    def __post_init__(self) -> None:
        validate(self)
        if not self.data_root and not self.images:
            raise ConfigError("--data-root: missing; pass your Cityscapes root (or --images for your own images)",
                              field="data_root")
        window, stride = self.window_hw, self.stride_hw
        if stride[0] > window[0] or stride[1] > window[1]:
            raise bad("stride", self.stride, f"must be at most the --window ({self.window}) on each side, or "
                                             f"pixels between windows get no prediction")
        if self.official and self.split == "test":
            raise bad("official", True, "the test split has no public labels; use it with val (or train)")

    @property
    def window_hw(self) -> tuple[int, int]:
        """``--window`` as ``(H, W)``."""
        return parse_hw(self.window, MIN_SIDE)  # type: ignore[return-value]

    @property
    def stride_hw(self) -> tuple[int, int]:
        """``--stride`` as ``(H, W)``."""
        return parse_hw(self.stride)  # type: ignore[return-value]

    def scale_list(self) -> tuple[float, ...]:
        """``--scales`` as floats."""
        return scale_list(self.scales)  # type: ignore[return-value]


# -- checking ----------------------------------------------------------------------------------------------
KINDS = {"int": (int, "an integer"), "float": (float, "a number"), "str": (str, "a string"),
         "bool": (bool, "true or false")}


def _kind(f: dataclasses.Field) -> tuple[type, str]:
    return KINDS[str(f.type)]


def validate(cfg: Any) -> None:
    """Type, choices and check of every field of ``cfg``; raises the first problem as a :class:`ConfigError`."""
    for f in fields(cfg):
        value, (kind, words) = getattr(cfg, f.name), _kind(f)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, f.name, value)
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value.strip())
                setattr(cfg, f.name, value)
            except ValueError:
                pass
        if kind is bool and isinstance(value, str) and value.strip().lower() in SWITCH_WORDS:  # `compile: yes`
            value = SWITCH_WORDS[value.strip().lower()]
            setattr(cfg, f.name, value)
        if f.metadata.get("path") and isinstance(value, str) and value.startswith("~"):
            value = os.path.expanduser(value)
            setattr(cfg, f.name, value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise bad(f.name, value, f"must be {words}")
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise bad(f.name, value, f"must be one of {', '.join(choices)}")
        problem = check(value) if check else None
        if problem:
            raise bad(f.name, value, problem)


class RecipeLoader(yaml.SafeLoader):
    """YAML as recipes mean it: only true and false are booleans (YAML 1.1 reads off, on, yes and no as booleans,
    so ``amp: off`` became False), and a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"{key} is given twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
#: How a recipe may spell a switch (YAML 1.1's words, which YAML 1.2 and RecipeLoader read as text).
SWITCH_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def load_yaml(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a recipe; every key must be a field of ``cls`` (values are checked with the config)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file() and (CONFIG_DIR / path.name).is_file() and not path.parent.name:
        path = CONFIG_DIR / path.name  # allow `--config demo.yaml` for the shipped recipes
    if not path.is_file():
        raise ConfigError(f"--config: got {str(path)!r}, no such file; pass a YAML recipe such as "
                          f"cityseg/configs/demo.yaml")
    text = _recipe_text(path)
    try:
        data = yaml.load(text, Loader=RecipeLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from e
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value at the top level")
    return check_keys(data, cls, str(path))


def _recipe_text(path: Path) -> str:
    """A recipe's text, which must be UTF-8 (a byte-order mark is fine); anything else is one line."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"--config {path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as "
                          f"UTF-8.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"--config {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}, as Latin-1 "
                          f"or Windows-1252 editors write accented letters); save it as UTF-8.") from None


def check_keys(data: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    """Normalise dashes to underscores and reject keys that are not fields of ``cls``."""
    normal: dict[str, Any] = {}
    for k, v in data.items():
        name = str(k).replace("-", "_")
        if name in normal:
            raise ConfigError(f"{source}: {name} is given twice (as {flag(name)[2:]} and {name}); keep one")
        normal[name] = v
    data = normal
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are the --flags of --help "
                          f"with dashes as underscores")
    return data


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`ConfigError` lines (``--flag: what is wrong``), not usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        message = re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1: ", message)
        if "ignored explicit argument" in message:
            message += "; a switch takes no value (--name or --no-name)"
        raise ConfigError(message)


def _convert(kind: type, words: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; must be {words}") from None
    return convert


def build_parser(cls: type = TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per field of ``cls``; unset flags are absent from the result."""
    parser = OneLineParser(description=description or cls.__doc__, allow_abbrev=False,
                     usage="%(prog)s [--config YAML] [--flag VALUE ...] (all flags: --help)",
                     argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="Recipe whose values replace the defaults; "
                        "flags given on the command line override it.")
    for f in fields(cls):
        kind, words = _kind(f)
        help_text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")
        choices = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag(f.name), type=_convert(kind, words), help=help_text,
                                metavar="{" + ",".join(choices) + "}" if choices else f.name.upper())
    return parser


def parse_config(argv: Sequence[str] | None = None, cls: type = TrainConfig) -> Any:
    """Defaults < ``--config`` recipe < command-line flags; a bad value raises :class:`ConfigError`."""
    args, extra = build_parser(cls).parse_known_args(argv)
    if extra:
        what = "unknown flag" if extra[0].startswith("-") else "unexpected argument (values follow their --flag)"
        raise ConfigError(f"{extra[0]}: {what}; --help lists every flag")
    given = vars(args)
    recipe = given.pop("config", None)
    values = load_yaml(recipe, cls) if recipe else {}
    from_recipe = set(values) - set(given)
    values.update(given)
    for name, example in cls.REQUIRED.items():
        if not values.get(name):
            raise ConfigError(f"{flag(name)}: missing; it is required, e.g. {flag(name)} {example}", field=name)
    try:
        cfg = cls(**values)
    except ConfigError as e:
        if e.field in from_recipe:
            raise ConfigError(f"{e} (set in {recipe})", field=e.field) from None
        raise
    if isinstance(cfg, TrainConfig):
        for line in ignored_options(cfg, set(values)):  # flags and recipe keys
            if speaks():
                print(f"note: {line}", file=sys.stderr, flush=True)
    return cfg


#: Fields that only the unet_<encoder> models use.
ENCODER_ONLY = ("decoder_channels", "encoder_weights", "encoder_lr_mult", "layer_decay", "layer_decay_num_layers",
                "drop_path")


def ignored_options(cfg: TrainConfig, given: set[str]) -> list[str]:
    """What the user set (``given``: flags and recipe keys) that the classic U-Net does not use, one line each."""
    if cfg.encoder is not None:
        return []
    return [f"{flag(name)} is ignored: --model {cfg.model} has no pretrained encoder (it applies to the "
            f"unet_<encoder> models)" for name in sorted(given) if name in ENCODER_ONLY]


def from_dict(data: dict[str, Any], cls: type = TrainConfig) -> Any:
    """Rebuild a config saved with ``to_dict`` (keys unknown to this version are errors)."""
    return cls(**check_keys(dict(data), cls, "saved config"))


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to the run."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
