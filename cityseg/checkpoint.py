"""Checkpoints: atomic writes, ``weights_only`` loads, RNG state capture, and config compatibility."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserError

LAST = "last.pt"
BEST = "best.pt"
PERIODIC = re.compile(r"ckpt_(\d+)\.pt")


class CheckpointError(UserError):
    """A checkpoint cannot be written, read or used with this config."""


class BareWeightsError(CheckpointError):
    """A file of model weights alone (a state dict) where a checkpoint written by train.py belongs."""


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, fsync, then rename.

    A failure (disk full, no permission, quota) removes the temp file and leaves the previous file at ``path``
    untouched; it is one :class:`CheckpointError` line, also when torch's zip writer reports a full disk as an
    ``enforce fail ... unexpected pos`` RuntimeError instead of the OSError underneath.
    """
    path = Path(path)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would hide it from the group and from serving accounts
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e, path.parent)  # before the temp file's space is freed
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write the checkpoint ({reason}); free "
                              f"space or fix permissions in {path.parent}, then run the same command. The previous "
                              f"checkpoint there is intact.") from None
    _fsync_dir(path.parent)


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under this process's umask: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def umask() -> int:
    """The process's umask: read from ``/proc/self/status`` where Linux has it, else set and restored at once
    (which another thread creating a file at that moment could see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def write_failure(e: BaseException, directory: Path) -> str:
    """What made a write into ``directory`` fail, in a few words: the OS's reason, or a full disk that a
    library's own error hides."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = -1
    if 0 <= free < 1 << 20:
        return f"No space left on device: {free / 2**20:.1f} MiB free"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def save_periodic(state: dict[str, Any], out_dir: str | Path, keep: int) -> Path:
    """Write ``ckpt_<iteration>.pt``, point ``last.pt`` at it, and keep only the newest ``keep`` of them.

    ``last.pt`` is a hard link (no second write) replaced atomically; where the file system has no hard
    links it is a copy. Older periodic files are deleted only after the new one is complete.
    """
    out = Path(out_dir)
    path = out / f"ckpt_{int(state['iteration']):08d}.pt"
    save(state, path)
    tmp = out / f".{LAST}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
        os.replace(tmp, out / LAST)
    except OSError:
        tmp.unlink(missing_ok=True)
        save(state, out / LAST)
    for old in periodic(out)[keep:]:
        old.unlink(missing_ok=True)
    return path


def periodic(out_dir: str | Path) -> list[Path]:
    """The ``ckpt_<iteration>.pt`` files of a run, newest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*.pt") if (m := PERIODIC.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(out_dir: str | Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run: ``last.pt``, else the newest good ``ckpt_*.pt``.

    An unreadable file is reported through ``warn`` and skipped (never deleted). When checkpoints exist but
    none can be read, that is an error rather than a silent fresh start.
    """
    out = Path(out_dir)
    candidates, seen = [], set()
    for p in [out / LAST, *periodic(out)]:
        if p.is_file() and (key := (p.stat().st_dev, p.stat().st_ino)) not in seen:  # last.pt is a hard link
            seen.add(key)
            candidates.append(p)
    failures = []
    for path in candidates:
        try:
            return path, load(path)
        except BareWeightsError:
            raise  # weights someone put there, not a damaged checkpoint: say so, and do not pass it by
        except CheckpointError as e:
            failures.append(str(e))
            warn(f"warning: {e} Trying the next newest checkpoint.")
    if failures:
        raise CheckpointError(f"{out}: none of its {len(failures)} checkpoints can be read; move them away to "
                              f"start from scratch, or point --out-dir elsewhere.")
    return None


def remove_stale_temps(out_dir: str | Path) -> None:
    """Delete temp files a killed writer left behind (finished checkpoints are never touched)."""
    for tmp in Path(out_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


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
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass a checkpoint file in it, such as {path / LAST}.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        from .models.weights import unreadable  # what the file is instead, never torch's weights_only=False advice

        raise CheckpointError(f"{path}: not a readable cityseg checkpoint ({unreadable(path, e)}); "
                              f"it may be truncated or from another program.") from e
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BareWeightsError(f"{path}: a bare state dict (model weights alone), not a checkpoint written by "
                               f"cityseg's train.py; to train from these weights, pass --init-from {path} with a "
                               f"new --out-dir (a run directory holding it cannot resume: move it out of there).",
                               collective=True)
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


#: What a checkpoint must hold to continue a run (cityseg's train.py writes all of it).
TRAINING_STATE = ("config", "optimizer", "scheduler", "scaler", "iteration", "epoch", "step_in_epoch",
                  "global_batch", "world_size", "log_window", "best_miou", "rng")


def check_resumable(state: dict[str, Any], path: Path) -> None:
    """A file in the run directory that holds weights but not the training state cannot be resumed from."""
    missing = [k for k in TRAINING_STATE if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: holds model weights but not the training state a resume needs (no "
            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); it was not written by cityseg's "
            f"train.py, or by another version. Move it out of {path.parent} to start a fresh run there, or start "
            f"from its weights in another directory with --init-from {path}.", collective=True)


def has_checkpoint(out_dir: str | Path) -> bool:
    """True when the run directory holds a checkpoint to resume from (readable or not: resume decides)."""
    out = Path(out_dir)
    return (out / LAST).is_file() or bool(periodic(out))
