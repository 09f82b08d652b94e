"""Run logging on the main rank: console/tqdm, ``metrics.jsonl``, ``train.log`` and Weights & Biases."""

from __future__ import annotations

import json
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from .labels import CLASS_NAMES, IGNORE_INDEX


def wandb_logged_in() -> bool:
    """True when an API key is configured (env or netrc); the key itself is never read out or logged."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``WANDB_MODE`` if set, else online when logged in, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return "off" if env == "disabled" else env
    return "online" if wandb_logged_in() else "offline"


class RunLogger:
    """Everything a run reports. Only the main rank writes; other ranks get a logger that does nothing."""

    def __init__(self, out_dir: str | Path, enabled: bool, metrics_file: str = "metrics.jsonl",
                 log_file: str = "train.log"):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.wandb_run = None
        self.bar = None
        #: The first write that failed (a full disk), as one line; the trainer stops the ranks on it.
        self.write_error = ""
        self.interactive = enabled and sys.stderr.isatty()
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / metrics_file
        self.metrics = open(self.metrics_path, "a", buffering=1)
        self.text = open(self.out_dir / log_file, "a", buffering=1)

    def open_bar(self, total: int, initial: int) -> None:
        """A tqdm bar on a terminal; batch logs (SLURM, CI) get plain lines from :meth:`report` instead."""
        if self.interactive and self.bar is None:
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="it", smoothing=0.1)

    def info(self, message: str) -> None:
        """A line for the console and the text log (``train.log``)."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        (self.bar.write if self.bar else print)(message, file=sys.stderr if self.bar else sys.stdout)
        sys.stdout.flush()
        self._write(self.text, f"{stamp} {message}\n")

    def _write(self, file: Any, text: str) -> None:
        """Append to one of the run's files; a failure is remembered (:attr:`write_error`), not raised, so
        that the ranks can stop together at a completed step."""
        if self.write_error and file.name in self.write_error:
            return  # that file already failed: a cut record is enough
        try:
            file.write(text)
        except OSError as e:
            self.failed(f"{file.name}: could not write ({e.strerror or e})")

    def failed(self, message: str) -> None:
        """Record a write of the run that failed (the first one counts)."""
        if not self.write_error:
            self.write_error = message

    def start_wandb(self, mode: str, config: dict[str, Any], run_id: str | None, project: str,
                    entity: str, name: str, job_type: str = "train") -> str | None:
        """Start (or continue, when ``run_id`` is given) the W&B run; returns its id."""
        if not self.enabled or mode == "off":
            return run_id
        import wandb  # imported here: starting W&B is slow and not every run uses it

        self.wandb_run = wandb.init(project=project, entity=entity or None, name=name or None, id=run_id,
                                    resume="allow", mode=mode, dir=str(self.out_dir), config=config,
                                    job_type=job_type,
                                    settings=wandb.Settings(console="off", silent=True))
        self.info(f"W&B run {self.wandb_run.id} ({mode})")
        return self.wandb_run.id

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Write one record to ``metrics.jsonl`` and W&B at ``step``."""
        if not self.enabled:
            return
        self._write(self.metrics, json.dumps({"iteration": step, **values}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_pictures(self, step: int, prefix: str, pictures: Any) -> None:
        """Send :class:`~cityseg.evaluation.Pictures` to W&B: predictions as segmentation masks with class
        labels, the IoU bars and the confusion heatmap."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        class_labels = {i: n for i, n in enumerate(CLASS_NAMES)} | {IGNORE_INDEX: "ignore"}
        images = [wandb.Image(image, caption=name, masks={
            "prediction": {"mask_data": pred, "class_labels": class_labels},
            "ground_truth": {"mask_data": gt, "class_labels": class_labels}})
            for name, image, gt, pred in pictures.samples]
        self.wandb_run.log({f"{prefix}/predictions": images,
                            f"{prefix}/iou_per_class": wandb.Image(pictures.bars),
                            f"{prefix}/confusion_matrix": wandb.Image(pictures.heatmap)}, step=step)

    def rewind(self, iteration: int) -> None:
        """Drop ``metrics.jsonl`` records after ``iteration`` (logged by a run that died before its next
        checkpoint), so a resumed run's file reads as if it had never stopped. A record cut short (a write that
        failed on a full disk) is dropped too, and said so: a log never blocks a resume."""
        if not self.enabled:
            return
        path = self.metrics_path
        self.metrics.close()
        kept, cut = [], 0
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                cut += 1
                continue
            if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        self.metrics = open(path, "a", buffering=1)
        if cut:
            self.info(f"{path}: dropped {cut} record(s) cut short by a write that failed (the checkpoint is "
                      f"complete; the steps after it are trained again)")

    def has_record(self, iteration: int, key: str) -> bool:
        """True when ``metrics.jsonl`` holds a complete record of ``iteration`` with ``key`` (where it is kept)."""
        if not self.enabled or not self.metrics_path.is_file():
            return False
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("iteration") == iteration and key in record:
                return True
        return False

    def advance(self) -> None:
        """Move the progress bar one iteration (a host-side counter: no device sync)."""
        if self.bar is not None:
            self.bar.update(1)

    def report(self, line: str, **postfix: Any) -> None:
        """Progress at a log interval: the bar's postfix on a terminal, otherwise a plain line."""
        if self.bar is not None:
            self.bar.set_postfix(postfix)
        else:
            self.info(line)

    def close(self) -> None:
        """Finish W&B and close files."""
        if not self.enabled or self.metrics.closed:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            self.wandb_run = None
            # Stop W&B's service process now, while the run's signal handling is in place, rather than in
            # an exit hook after Python has put the default handlers back (a SIGTERM then kills the process).
            wandb.teardown()
        self.metrics.close()
        self.text.close()
