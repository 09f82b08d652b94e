"""Export a checkpoint to ONNX, and check the file with onnxruntime against PyTorch.

    python -m cityseg.onnx --checkpoint runs/unet/best.pt --out unet.onnx

The graph's input ``image`` is uint8 RGB, N x 3 x H x W; its output ``logits`` float32 N x 19 x H x W. N, H and W
are dynamic (H and W at least the model's multiple, 16 or 32). The normalisation and the padding to the model's
multiple are inside the graph. Exported through torch.export (``torch.onnx.export(..., dynamo=True)``); needs
``pip install 'cityseg[onnx]'`` (onnx, onnxscript, onnxruntime) and torch 2.11 or newer. The command runs the
file once under onnxruntime on an image whose sides are not multiples of 16 (``--check-size``), prints the
largest logit difference and the argmax agreement with PyTorch, and writes ``--out`` only when they agree on at
least 99.9% of the pixels (else it exits with status 1, and a file already there is left as it was).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence


def _exit_interrupted() -> None:
    """Ctrl-C of ``python -m cityseg.onnx``: one line, and status 130 at once. (After a KeyboardInterrupt raised
    inside exec'd code, as dataclasses and torch.fx run, CPython's normal exit would re-raise SIGINT.)"""
    print("python -m cityseg.onnx: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


try:  # Ctrl-C during these slow imports of `python -m cityseg.onnx` is one line too, as later
    import numpy as np
    import torch
    import torch.nn as nn

    from .checkpoint import file_mode
    from .config import OneLineParser, parse_hw
    from .errors import UserError, first_line, report_user_errors
    from .labels import NUM_CLASSES
    from .transforms import MEAN, STD
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    _exit_interrupted()

#: The agreement the check demands of onnxruntime's argmax against PyTorch's.
MIN_AGREEMENT = 0.999


class ExportError(UserError):
    """The export cannot run here, or cannot write its file."""


class CheckFailed(Exception):
    """The onnxruntime check of a fresh export failed; the message says how."""


class ImageToLogits(nn.Module):
    """uint8 N x 3 x H x W RGB -> float32 logits N x C x H x W: the model with its input normalisation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image.float() - self.mean) / self.std).float()


#: The oldest torch whose exporter these models were checked with (2.6.0, 2.7.1 and 2.9.1 failed; 2.10 not tried).
ONNX_TORCH = (2, 11)


def _needs() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    if missing:
        raise ExportError(f"the ONNX export needs {', '.join(missing)}: pip install 'cityseg[onnx]'.")
    if torch_version() < ONNX_TORCH:
        raise ExportError(f"the ONNX export needs torch {ONNX_TORCH[0]}.{ONNX_TORCH[1]} or newer (the exporters of "
                          f"torch 2.6 to 2.9 fail on these models or fix the graph's width to the example's); this "
                          f"is torch {torch.__version__}.")


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_out(out: str | Path) -> Path:
    """``--out`` as a path, refused at once when it is a directory (rather than after the export)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; pass the path of the .onnx file to write, e.g. "
                          f"{out / 'model.onnx'}.")
    return out


def export(model: nn.Module, out: str | Path, verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (a cityseg model, any registered kind) as ONNX to ``out``, via a temp file beside it that
    ``verify(temp)`` may check first: an existing file at ``out`` is replaced only by a complete (and checked)
    export. The file gets the mode the umask gives new files."""
    _needs()
    out = check_out(out)
    graph = ImageToLogits(model.float().eval()).eval()
    multiple = int(getattr(model, "multiple", 32))
    # batch 2 and sides of two multiples: sizes of 1 would be fixed into the graph
    example = torch.randint(0, 256, (2, 3, 2 * multiple, 4 * multiple), dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=multiple),
            3: torch.export.Dim("width", min=multiple)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror or e}); pass a writable path.") from None
    tmp = Path(name)
    try:
        _write(graph, example, dims, tmp, out)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise ExportError(f"--out {out}: could not write the file ({e.strerror or e}); free space there or pass "
                          f"another path. Nothing was replaced.") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write(graph: nn.Module, example: torch.Tensor, dims: dict, tmp: Path, out: Path) -> None:
    """Export ``graph`` into ``tmp`` with the mode of a new file (mkstemp's is 0600)."""
    exporter = logging.getLogger("torch.onnx")
    level = exporter.level
    exporter.setLevel(logging.ERROR)  # torch's exporter warns about its own internals (torchvision ops it skips)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["image"],
                                        output_names=["logits"], dynamic_shapes={"image": dims})
        program.save(str(tmp))
        os.chmod(tmp, file_mode())
    except OSError:
        raise
    except Exception as e:  # torch.export and onnxscript raise many types; the model is cityseg's own
        raise ExportError(f"the ONNX export of this model failed ({first_line(e)}); nothing was written to "
                          f"{out}.") from e
    finally:
        exporter.setLevel(level)


def check(path: str | Path, model: nn.Module, images: np.ndarray) -> tuple[float, float]:
    """(largest logit difference, argmax agreement) of onnxruntime's output against PyTorch's for ``images``
    (uint8 N x 3 x H x W)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(["logits"], {"image": images})[0]
    with torch.no_grad():
        theirs = ImageToLogits(model.float().eval()).eval()(torch.from_numpy(images)).numpy()
    return float(np.abs(ours - theirs).max()), float((ours.argmax(1) == theirs.argmax(1)).mean())


def check_bytes(size: tuple[int, int], num_classes: int = NUM_CLASSES) -> int:
    """About the memory :func:`check` needs on one image of ``size``: the image, its float copy, both runs'
    logits, and a few full-resolution activations of each run (four maps of 64 float channels)."""
    h, w = size
    return h * w * (3 + 4 * (3 + 2 * num_classes + 2 * 4 * 64))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cityseg.onnx``: 0 when the export is written, 1 when it failed its check (2: a user error)."""
    p = OneLineParser(prog="python -m cityseg.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="A checkpoint written by train.py (best.pt, last.pt).")
    p.add_argument("--out", required=True, help="The .onnx file to write (only once it passed the check).")
    p.add_argument("--use-ema", choices=("auto", "yes", "no"), default="auto",
                   help="Export the moving average of the weights: auto = when the checkpoint has one.")
    p.add_argument("--check-size", default="250x500", help="HxW of the image the export is checked on (sides that "
                   "are not multiples of 16 exercise the padding inside the graph), each at least the model's "
                   "multiple (32 for the encoder U-Nets).")
    from .eval_job import load_model

    with report_user_errors():
        args = p.parse_args(argv)
        out = check_out(args.out)
        model, state = load_model(Path(args.checkpoint).expanduser(), torch.device("cpu"), args.use_ema)
        size = _check_size(args.check_size, int(getattr(model, "multiple", 32)))
        images = np.random.default_rng(0).integers(0, 256, (1, 3, *size), dtype=np.uint8)
        measured: list[float] = []

        def verify(tmp: Path) -> None:
            try:
                measured.extend(check(tmp, model, images))
            except Exception as e:  # onnxruntime's own errors, MemoryError
                raise CheckFailed(f"the check raised {type(e).__name__}: {first_line(e)}") from e
            if measured[1] < MIN_AGREEMENT:
                raise CheckFailed(f"argmax agreement {100 * measured[1]:.3f}% is below {100 * MIN_AGREEMENT:.1f}%")

        checked = f"onnxruntime against PyTorch on a 1x3x{size[0]}x{size[1]} image"
        try:
            export(model, out, verify)
        except CheckFailed as e:
            if measured:
                print(f"{checked}: largest logit difference {measured[0]:.2e}, argmax agreement "
                      f"{100 * measured[1]:.3f}%")
            kept = "the file already there is unchanged" if out.exists() else "nothing was written"
            print(f"error: --out {out}: the export failed its check ({e}); {kept}.", file=sys.stderr)
            return 1
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; {state['config'].get('model', 'unet')}, "
              f"{state['evaluated']} weights of iteration {state.get('iteration')}); {checked}: largest logit "
              f"difference {measured[0]:.2e}, argmax agreement {100 * measured[1]:.3f}%")
    return 0


def _check_size(text: str, multiple: int) -> tuple[int, int]:
    """``--check-size`` as (H, W), refused when malformed or when the check would not fit in memory."""
    size = parse_hw(text, multiple)
    if size is None:
        raise ExportError(f"--check-size: got {text!r}; must look like HxW with sides of at least {multiple}, this "
                          f"model's multiple.")
    need, have = check_bytes(size), available_memory()
    if have is not None and need > have:
        raise ExportError(f"--check-size {text}: the onnxruntime check at that size needs about {_gib(need)} of "
                          f"memory and this machine has {_gib(have)} available; pass a smaller --check-size "
                          f"(the default is 250x500).")
    return size


if __name__ == "__main__":
    try:
        status = main()
    except KeyboardInterrupt:
        _exit_interrupted()
    sys.exit(status)
