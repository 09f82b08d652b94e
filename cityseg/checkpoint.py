"""Checkpoints: atomic writes, ``weights_only`` loads, RNG state capture, and config compatibility."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

LAST = "last.pt"
BEST = "best.pt"
#: Config fields that change what a checkpoint's tensors mean; resuming with another value is refused.
SHAPE_FIELDS = ("width",)


class CheckpointError(UserError):
    """A checkpoint cannot be written, read or used with this config."""


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, fsync, then rename.

    A failure (disk full, no permission) leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write the checkpoint ({e.strerror or e}); free space or fix "
                              f"permissions in {path.parent}. The previous checkpoint there is intact.") from e
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable cityseg checkpoint ({type(e).__name__}); "
                              f"it may be truncated or from another program.") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a cityseg checkpoint (no 'model' entry).")
    return state


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model: no ``module.`` (DDP) or ``_orig_mod.`` (compile) prefixes."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.state_dict()


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types ``weights_only`` loads."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when a field that shapes the checkpoint's tensors differs."""
    for name in SHAPE_FIELDS:
        if name in saved and saved[name] != current[name]:
            raise CheckpointError(
                f"{path} was trained with --{name.replace('_', '-')} {saved[name]} but this run asks for "
                f"{current[name]}; use the same value, or a new --out-dir to start a fresh run.")
