"""The evaluate.py job: a checkpoint on a Cityscapes split (scores, official export, pictures, W&B), or on
your own images (colour overlays). The loop it shares with training is :mod:`cityseg.evaluation`."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as du
from .config import ConfigError, EvalConfig, TrainConfig
from .data import CityscapesDataset, check_shared_memory, read_image, sample_bytes, shutdown
from .errors import DataError, UserError, first_line
from .evaluation import Pictures, Predictor, evaluate, make_pictures, val_loader
from .export import official_scores, prediction_path, write_prediction
from .inference import InferenceMode
from .labels import colorize
from .logger import RunLogger, resolve_wandb_mode
from .metrics import format_table
from .models import MODELS, inference_weights, model_from_config, model_options
from .models.weights import WeightsError, check_weights
from .precision import amp_dtype
from .runlock import own_directory
from .visualize import overlay, write_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class OutputError(UserError):
    """An output path of evaluate.py cannot be written; every rank finds the same."""

    collective = True


#: How a checkpoint train.py never writes comes about.
EDITED = "it was edited, or written by another program or version."


def load_model(path: str | Path, device: torch.device, use_ema: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The model a checkpoint describes (built by the registry, without the auxiliary head of training) with its
    weights: the moving average when it has one (``use_ema`` auto or yes), else the raw ones. A checkpoint whose
    config or weights are not as train.py writes them is one :class:`CheckpointError` line naming the file."""
    state = ckpt.load(path)
    config = _saved_config(state, path)
    ema = state.get("ema")
    if use_ema == "yes" and not ema:
        raise ckpt.CheckpointError(f"{path}: holds no moving average of the weights (it was trained without "
                                   f"--ema-decay); pass --use-ema auto or no.", collective=True)
    evaluated = "ema" if ema and use_ema != "no" else "model"
    weights = _saved_weights(state, evaluated, path)
    model = model_from_config(config)
    what = f"{'moving-average' if evaluated == 'ema' else 'model'} weights of the model its saved config names"
    try:
        check_weights(weights, model.state_dict(), path, f"{what} ({_described(config)})")
        model.load_state_dict(weights)
    except WeightsError as e:  # its advice is for weight files, not checkpoints
        problem = str(e).removesuffix("; pass a file made for it.").rstrip(".")
        raise ckpt.CheckpointError(f"{problem}; {EDITED}", collective=True) from None
    except RuntimeError as e:  # right keys and shapes, but a tensor that cannot be copied in (its dtype)
        raise ckpt.CheckpointError(f"{path}: its weights do not load into the model its saved config names "
                                   f"({first_line(e)}); {EDITED}", collective=True) from None
    state["evaluated"] = evaluated
    return model.to(device, memory_format=torch.channels_last).eval(), state  # as in training


def _saved_config(state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint's training config, its model fields checked as train.py's own flags are."""
    if "config" not in state:
        raise ckpt.CheckpointError(f"{path}: has no saved config; it was not written by cityseg's train.py.",
                                   collective=True)
    config = state["config"]
    if not isinstance(config, dict):
        raise ckpt.CheckpointError(f"{path}: its saved config is a {type(config).__name__}, not the mapping "
                                   f"train.py writes; {EDITED}", collective=True)
    name = config.get("model", "unet")  # checkpoints older than --model hold the classic U-Net
    if not isinstance(name, str) or name not in MODELS:
        raise ckpt.CheckpointError(f"{path}: its saved config names model {name!r}, which this cityseg does not "
                                   f"have (it has {', '.join(sorted(MODELS))}); {EDITED}", collective=True)
    try:
        TrainConfig(**{k: config[k] for k in ("model", *model_options(name)) if k in config})
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{path}: its saved config is not one train.py writes "
                                   f"({str(e).removeprefix('--')}); {EDITED}", collective=True) from None
    return config


def _saved_weights(state: dict[str, Any], which: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The raw (``which`` = "model") or moving-average ("ema") weights of a checkpoint, without the auxiliary
    head; a dict of tensors, or one line saying what is there instead."""
    entry = state["model"] if which == "model" else state["ema"]
    if which == "ema":
        if not isinstance(entry, dict) or "weights" not in entry:
            raise ckpt.CheckpointError(f"{path}: its 'ema' entry holds no 'weights'; {EDITED} Pass --use-ema no "
                                       f"(cityseg.load: use_ema='no') to use its raw weights.", collective=True)
        entry = entry["weights"]
    if not isinstance(entry, dict):
        problem = f"a {type(entry).__name__}"
    else:
        bad = next((k for k, v in entry.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        problem = None if bad is None else f"its {bad!r} is of type {type(entry[bad]).__name__}"
    if problem:
        where = "'model' entry" if which == "model" else "'ema' entry's 'weights'"
        raise ckpt.CheckpointError(f"{path}: its {where} is not a dict of tensors ({problem}); {EDITED}",
                                   collective=True)
    return inference_weights(entry)


def _described(config: dict[str, Any]) -> str:
    name = config.get("model", "unet")
    return ", ".join([name, *(f"{k} {config[k]}" for k in model_options(name) if k in config)])


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not write ({e.strerror or e}); the scores are printed above.") from None


def check_writable(directory: Path, what: str) -> None:
    """Make ``directory`` if needed and write a file into it, before the first image is evaluated."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{what} {directory}: is a file, not a directory; pass a directory.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".cityseg-write-check-"):
            pass
    except OSError as e:
        raise OutputError(f"{what} {directory}: cannot write there ({e.strerror or e}); pass {what.split()[0]} "
                          f"with a writable directory.") from None


def run_evaluation(cfg: EvalConfig) -> dict[str, Any] | None:
    """The evaluate.py job: shard the split over ranks, all-reduce once, report on rank 0."""
    # cuDNN autotuning pays off when the images share one size (a Cityscapes split); --images may give many
    torch.backends.cudnn.benchmark = not cfg.images
    out = Path(cfg.out_dir or Path(cfg.checkpoint).parent)
    out_flag = "--out-dir" if cfg.out_dir else "--out-dir (by default the checkpoint's directory)"
    with du.session(cfg.device) as ctx:
        model, state = load_model(cfg.checkpoint, ctx.device, cfg.use_ema)
        mode = InferenceMode(cfg.mode, cfg.window_hw, cfg.stride_hw, cfg.tta == "flip", cfg.scale_list())
        predictor = Predictor(model, ctx.device, amp_dtype(cfg.amp, ctx.device), True, mode)
        if cfg.images:
            return predict_images(predictor, cfg.images, out / "overlays", ctx, out_flag)
        return _evaluate_split(cfg, ctx, predictor, state, out, out_flag)


#: Largest difference between the official script's mIoU and ours that is rounding, not a defect.
OFFICIAL_TOLERANCE = 1e-6


def _evaluate_split(cfg: EvalConfig, ctx: du.DistContext, predictor: Predictor, state: dict[str, Any],
                    out: Path, out_flag: str) -> dict[str, Any] | None:
    export_dir = Path(cfg.export_dir) if cfg.export_dir else (out / "predictions" if cfg.official else None)
    if cfg.split == "test" and export_dir is None:
        raise ConfigError("the test split has no public labels, so nothing can be scored; pass --export-dir DIR "
                          "to write predictions for the Cityscapes benchmark server.")
    if export_dir is None:
        return _score_split(cfg, ctx, predictor, state, out, out_flag, None)
    # one writer per export directory, as one training run per run directory: two evaluations writing the same
    # file names would mix their predictions, and the official score would be of the mix
    flag = "--export-dir" if cfg.export_dir else f"{out_flag} (for predictions/)"
    check_writable(export_dir, flag)
    with own_directory(export_dir, ctx, flag.split(" (")[0], "evaluate.py writing predictions"):
        return _score_split(cfg, ctx, predictor, state, out, out_flag, export_dir)


def _score_split(cfg: EvalConfig, ctx: du.DistContext, predictor: Predictor, state: dict[str, Any], out: Path,
                 out_flag: str, export_dir: Path | None) -> dict[str, Any] | None:
    test = cfg.split == "test"
    loader, dataset = val_loader(cfg.data_root, cfg.split, ctx, cfg.workers, cfg.max_images, labels=not test)
    if not test:
        check_writable(out, out_flag)
    du.agree(lambda: check_shared_memory([(cfg.workers, sample_bytes(dataset))], du.local_world_size()),
             ctx.control_group)
    if cfg.mode == "slide":
        _check_window(cfg, dataset)
    on_batch = None
    if export_dir is not None:
        def on_batch(indices: list[int], labels: torch.Tensor, pred: torch.Tensor) -> None:
            for i, p in zip(indices, pred.to(torch.uint8).cpu().numpy()):
                try:
                    write_prediction(export_dir, dataset.samples[i].name, p)
                except OSError as e:  # every rank stops with it (evaluate gathers the failures)
                    raise OutputError(f"{e}; free space there, or pass another --export-dir.") from None
    try:
        cm = evaluate(predictor, loader, on_batch)
    finally:
        shutdown(loader)
    du.barrier()  # every rank's exports are on disk
    if not ctx.is_main:
        return None
    evaluated = dataset.samples[: len(dataset) if not cfg.max_images else cfg.max_images]
    if test:
        print(f"{cfg.split}: wrote {len(evaluated)} predictions to {export_dir}; no metrics are computed "
              f"(the test labels are not public: submit the files to the Cityscapes benchmark server).")
        return {"exported": len(evaluated), "export_dir": str(export_dir)}
    result = cm.compute()
    result.update(split=cfg.split, checkpoint=str(cfg.checkpoint), iteration=state.get("iteration"),
                  weights=state["evaluated"], num_images=len(evaluated), mode=cfg.mode, tta=cfg.tta,
                  scales=list(cfg.scale_list()))
    if cfg.official:
        result["official"] = official_scores([prediction_path(export_dir, s.name) for s in evaluated],
                                             [s.label for s in evaluated])
    _report(cfg, result, out, ctx, export_dir)  # the scores first: a failed write below must not hide them
    write_json(result, out / "metrics.json")
    _check_official(result, export_dir)
    pictures = make_pictures(predictor, dataset, result, cm.mat.cpu().numpy(), cfg.num_pictures)
    try:
        pictures.save(out / "pictures")
    except OSError as e:
        raise OutputError(f"{e}; the scores are printed above and in {out / 'metrics.json'}.") from None
    _log_wandb(cfg, result, pictures, state, out)
    return result


def _check_official(result: dict[str, Any], export_dir: Path | None) -> None:
    """The official script scores the exported PNGs: if its mIoU is not ours, those files are not this
    evaluation's predictions alone, and neither score can be trusted."""
    off = result.get("official")
    if not off or off["miou"] is None or result["miou"] is None:
        return
    diff = abs(off["miou"] - result["miou"])
    if diff > OFFICIAL_TOLERANCE:
        raise OutputError(f"--official: cityscapesscripts' mIoU {_fmt(off['miou'])} differs from ours "
                          f"{_fmt(result['miou'])} by {diff:.1e} (more than {OFFICIAL_TOLERANCE:g}): the PNGs in "
                          f"{export_dir} are not all this evaluation's (another writer, or files left from another "
                          f"checkpoint); export into an empty --export-dir and evaluate again.", collective=False)


def _check_window(cfg: EvalConfig, dataset: CityscapesDataset) -> None:
    """A sliding window must fit the split's images (Cityscapes images all have one size; the first tells)."""
    h, w = dataset.load(0)[0].shape[:2]
    if cfg.window_hw[0] > h or cfg.window_hw[1] > w:
        raise ConfigError(f"--window: got {cfg.window!r}, larger than the images of split {cfg.split} ({h}x{w}); "
                          f"use at most {h}x{w}, or --mode whole", field="window")


def _report(cfg: EvalConfig, result: dict[str, Any], out: Path, ctx: du.DistContext, export_dir: Path | None) -> None:
    print(format_table(result))
    if "official" in result:
        off = result["official"]
        diff = abs(off["miou"] - result["miou"]) if off["miou"] is not None and result["miou"] is not None else 0
        print(f"official cityscapesscripts: class mIoU {_fmt(off['miou'])}, category mIoU "
              f"{_fmt(off['category_miou'])} (ours {_fmt(result['miou'])}, difference {diff:.2e})")
    if export_dir is not None:
        print(f"predictions in the official format: {export_dir}")
    print(f"{cfg.split}: mIoU {_fmt(result['miou'])} over {result['num_images']} images "
          f"({ctx.world_size} process{'es' if ctx.world_size > 1 else ''}); writing {out / 'metrics.json'} "
          f"and pictures in {out / 'pictures'}", flush=True)


def _log_wandb(cfg: EvalConfig, result: dict[str, Any], pictures: Pictures, state: dict[str, Any],
               out: Path) -> None:
    mode = resolve_wandb_mode(cfg.wandb)
    if mode == "off":
        return
    log = RunLogger(out, enabled=True, metrics_file="eval_metrics.jsonl", log_file="eval.log")  # not the run's
    try:
        log.start_wandb(mode, {**state["config"], "eval": {f.name: getattr(cfg, f.name) for f in fields(cfg)}},
                        None, cfg.wandb_project, cfg.wandb_entity, f"eval-{Path(cfg.checkpoint).parent.name}",
                        job_type="eval")
        step = int(state.get("iteration") or 0)
        log.log(step, {f"{cfg.split}/miou": result["miou"], f"{cfg.split}/pixel_acc": result["pixel_acc"]})
        log.log_pictures(step, cfg.split, pictures)
    finally:
        log.close()


def image_files(pattern: str) -> tuple[list[Path], Path]:
    """The images ``--images`` names (a directory's own files, or a glob where ``**`` spans folders), each real
    file once, and the folder their outputs' relative paths start from."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        try:
            files, base = _images(path.iterdir()), path
        except OSError as e:
            raise DataError(f"--images {pattern}: cannot list the directory ({e.strerror or e}).",
                            collective=True) from None
        if not files and any(_images(_listing(d)) for d in _directories(path)):
            raise DataError(f"--images {pattern}: no images in the directory itself, only in its subfolders (a "
                            f"directory is not searched recursively); pass --images '{pattern.rstrip('/')}/**/*'.",
                            collective=True)
    else:
        files = _images(Path(p) for p in _glob(os.path.expanduser(pattern)))
        base = Path(os.path.commonpath([str(p.parent) for p in files])) if files else path.parent
    if not files:
        raise DataError(f"--images {pattern}: no .png/.jpg/.jpeg/.bmp images found; pass a directory or a glob.",
                        collective=True)
    return files, base


def _images(paths: Iterable[Path]) -> list[Path]:
    """The image files among ``paths``, sorted, one path per real file: the one without symlinks if there is
    one, else the shortest."""
    best: dict[str, tuple[bool, int, Path]] = {}
    for p in paths:
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            real = os.path.realpath(p)
            key = (real != os.path.abspath(p), len(p.parts), p)
            best[real] = min(best.get(real, key), key)
    return sorted(p for _, _, p in best.values())


def _listing(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:  # unreadable: glob skips such folders too
        return []


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that a ``**`` enters each real directory once: a symlink
    loop is not walked round (glob's own walk multiplies paths with every pass, as far as the OS allows)."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    k = parts.index("**")
    head, rest = os.sep.join(parts[:k]) or (os.sep if k else os.curdir), parts[k + 1:] or ["*"]
    roots = glob.glob(head) if glob.has_magic(head) else [head]  # a trailing ** (rest "*"): files at any depth
    found = []
    for root in roots:
        for directory in _directories(Path(root)):
            found += _glob(os.path.join(glob.escape(str(directory)), *rest))
    return found


def _directories(root: Path) -> Iterator[Path]:
    """``root`` and the directories below it that are not hidden, symlinked ones included, each real directory
    once (by the path without symlinks where there is one, as the real tree is walked first)."""
    seen: set[str] = set()
    pending = [root] if root.is_dir() else []
    while pending:
        for top, dirs, _ in os.walk(pending.pop(0)):  # symlinked directories are listed, not entered
            real = os.path.realpath(top)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            yield Path(top)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            pending += [Path(top, d) for d in dirs if os.path.islink(os.path.join(top, d))]


def output_stems(files: list[Path], base: Path, out_dir: Path, pattern: str) -> list[Path]:
    """``OUT/<path relative to base, without suffix>`` for each file; two inputs that would share outputs
    (``x.png`` beside ``x.jpg``) are refused before anything is written."""
    stems: dict[Path, Path] = {}
    for f in files:
        stem = out_dir / f.relative_to(base).with_suffix("")
        if stem in stems:
            raise DataError(f"--images {pattern}: {stems[stem]} and {f} would both be written as "
                            f"{stem}_overlay.png; rename one of them, or predict them separately.", collective=True)
        stems[stem] = f
    return list(stems)


def predict_images(predictor: Predictor, pattern: str, out_dir: Path, ctx: du.DistContext,
                   out_flag: str = "--out-dir") -> dict[str, Any]:
    """Predict arbitrary images (any size) and write ``<name>_overlay.png`` and ``<name>_pred.png`` under
    ``out_dir``, keeping their paths relative to the folder the images come from."""
    files, base = image_files(pattern)
    stems = output_stems(files, base, out_dir, pattern)
    check_writable(out_dir, out_flag)
    for f, stem in list(zip(files, stems))[ctx.rank::ctx.world_size]:
        image = read_image(f)
        pred = predictor(torch.from_numpy(image)[None])[0].to(torch.uint8).cpu().numpy()
        write_rgb(Path(f"{stem}_overlay.png"), overlay(image, pred))
        write_rgb(Path(f"{stem}_pred.png"), colorize(pred))
    du.barrier()
    if ctx.is_main:
        print(f"wrote colour overlays of {len(files)} images to {out_dir}")
    return {"images": len(files), "out_dir": str(out_dir)}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
