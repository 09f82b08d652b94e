"""Export a checkpoint to ONNX, and check the file with onnxruntime against PyTorch.

    python -m cityseg.onnx --checkpoint runs/unet/best.pt --out unet.onnx

The graph's input ``image`` is uint8 RGB, N x 3 x H x W; its output ``logits`` float32 N x 19 x H x W. N, H and W
are dynamic (H and W at least the model's multiple, 16 or 32). The normalisation and the padding to the model's
multiple are inside the graph. Exported through torch.export (``torch.onnx.export(..., dynamo=True)``); needs
``pip install 'cityseg[onnx]'`` (onnx, onnxscript, onnxruntime) and torch 2.6 or newer. The command runs the
file once under onnxruntime on an image whose sides are not multiples of 16, prints the largest logit
difference and the argmax agreement with PyTorch, and exits with status 1 below 99.9%.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .config import OneLineParser
from .errors import UserError, first_line, report_user_errors
from .transforms import MEAN, STD

#: The agreement the check demands of onnxruntime's argmax against PyTorch's.
MIN_AGREEMENT = 0.999


class ExportError(UserError):
    """The export cannot run here, or cannot write its file."""


class ImageToLogits(nn.Module):
    """uint8 N x 3 x H x W RGB -> float32 logits N x C x H x W: the model with its input normalisation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image.float() - self.mean) / self.std).float()


def _needs() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    if missing:
        raise ExportError(f"the ONNX export needs {', '.join(missing)}: pip install 'cityseg[onnx]'.")
    if torch_version() < (2, 6):
        raise ExportError(f"the ONNX export needs torch 2.6 or newer (torch.onnx.export(dynamo=True)); this is "
                          f"torch {torch.__version__}.")


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def export(model: nn.Module, out: str | Path) -> Path:
    """Write ``model`` (a cityseg model, any registered kind) as ONNX to ``out`` (via a temp file: an existing
    file there is replaced only by a complete export)."""
    _needs()
    out = Path(out).expanduser()
    graph = ImageToLogits(model.float().eval()).eval()
    multiple = int(getattr(model, "multiple", 32))
    # batch 2 and sides of two multiples: sizes of 1 would be fixed into the graph
    example = torch.randint(0, 256, (2, 3, 2 * multiple, 4 * multiple), dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=multiple),
            3: torch.export.Dim("width", min=multiple)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror or e}); pass a writable path.") from None
    try:
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes={"image": dims})
        program.save(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise ExportError(f"--out {out}: could not write the file ({e.strerror or e}); free space there or pass "
                          f"another path. Nothing was replaced.") from None
    except Exception as e:  # torch.export and onnxscript raise many types; the model is cityseg's own
        raise ExportError(f"the ONNX export of this model failed ({first_line(e)}); nothing was written.") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def check(path: str | Path, model: nn.Module, images: np.ndarray) -> tuple[float, float]:
    """(largest logit difference, argmax agreement) of onnxruntime's output against PyTorch's for ``images``
    (uint8 N x 3 x H x W)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(["logits"], {"image": images})[0]
    with torch.no_grad():
        theirs = ImageToLogits(model.float().eval()).eval()(torch.from_numpy(images)).numpy()
    return float(np.abs(ours - theirs).max()), float((ours.argmax(1) == theirs.argmax(1)).mean())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cityseg.onnx``."""
    p = OneLineParser(prog="python -m cityseg.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="A checkpoint written by train.py (best.pt, last.pt).")
    p.add_argument("--out", required=True, help="The .onnx file to write.")
    p.add_argument("--use-ema", choices=("auto", "yes", "no"), default="auto",
                   help="Export the moving average of the weights: auto = when the checkpoint has one.")
    p.add_argument("--check-size", default="250x500", help="HxW of the image the export is checked on (sides that "
                   "are not multiples of 16 exercise the padding inside the graph), each at least the model's "
                   "multiple (32 for the encoder U-Nets).")
    from .config import parse_hw
    from .eval_job import load_model

    with report_user_errors():
        args = p.parse_args(argv)
        model, state = load_model(Path(args.checkpoint).expanduser(), torch.device("cpu"), args.use_ema)
        multiple = int(getattr(model, "multiple", 32))
        size = parse_hw(args.check_size, multiple)
        if size is None:
            raise ExportError(f"--check-size: got {args.check_size!r}; must look like HxW with sides of at least "
                              f"{multiple}, this model's multiple.")
        out = export(model, args.out)
        images = np.random.default_rng(0).integers(0, 256, (1, 3, *size), dtype=np.uint8)
        diff, agreement = check(out, model, images)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; {state['config'].get('model', 'unet')}, "
              f"{state['evaluated']} weights of iteration {state.get('iteration')}); onnxruntime against PyTorch "
              f"on a 1x3x{size[0]}x{size[1]} image: largest logit difference {diff:.2e}, argmax agreement "
              f"{100 * agreement:.3f}%")
        if agreement < MIN_AGREEMENT:
            print(f"error: {out}: argmax agreement {100 * agreement:.3f}% is below {100 * MIN_AGREEMENT:.1f}%; do "
                  f"not use this file.", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
