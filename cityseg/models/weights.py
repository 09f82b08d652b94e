"""Pretrained encoder weights: ``--encoder-weights imagenet|none|PATH``.

``imagenet`` fetches the encoder's official file once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``,
by default ``~/.cache/torch/hub/checkpoints``) and checks its SHA-256; a node without internet uses a filled
cache (``python -m cityseg.models.weights resnet50 ...`` on a machine with internet, then copy the files) or a
``PATH``. A ``PATH`` is a torchvision ``.pth``, or a timm ``.safetensors`` or ``.bin``, read without running
code (``weights_only``; safetensors is plain data). Classifier keys are dropped; anything else missing or
unexpected, or a file that is not what it claims, is one line naming the file.

    python -m cityseg.models.weights resnet50 convnext_tiny   # fill the cache, print where each file is
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError, first_line
from .registry import ENCODERS

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class WeightsError(UserError):
    """A weight file that cannot be fetched, read or used for its encoder; every rank meets the same one."""

    collective = True


def cache_path(name: str) -> Path:
    """Where ``imagenet`` weights of encoder ``name`` are cached."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ENCODERS[name].imagenet.filename


def resolve_weights(name: str, option: str) -> Path | None:
    """The file ``--encoder-weights option`` means for encoder ``name`` (None for ``none``), fetching the
    ImageNet file if it is not cached yet."""
    if option == "none":
        return None
    if option != "imagenet":
        path = Path(option).expanduser()
        if not path.is_file():
            raise WeightsError(f"--encoder-weights {option}: no such file; pass a torchvision .pth or timm "
                               f".safetensors/.bin file, imagenet, or none.")
        return path
    official = ENCODERS[name].imagenet
    path = cache_path(name)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(official.url, str(path), hash_prefix=official.sha256, progress=False)
        except Exception as e:  # urllib's URLError/HTTPError, torch.hub's hash mismatch, OSError
            raise WeightsError(f"--encoder-weights imagenet: could not fetch {official.url} into {path} "
                               f"({first_line(e)}); on a node without internet, fill the cache elsewhere "
                               f"(python -m cityseg.models.weights {name}) or pass the file's path.") from None
    check_sha256(path, official.sha256)
    return path


def check_sha256(path: Path, expected: str) -> None:
    """The file's SHA-256 must start with ``expected`` (a whole hash, or the prefix a file name carries)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(expected):
        raise WeightsError(f"{path}: SHA-256 {digest.hexdigest()[:16]}... is not the official file's "
                           f"({expected[:16]}...); it is damaged or another file. Delete it to fetch it again.")


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a ``.pth``/``.bin``/``.pt`` torch file (a plain state
    dict, or one under ``state_dict``/``model``), without running any code from it."""
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # truncated archives, pickles that need code, text files...
        raise WeightsError(f"{path}: not a readable weight file ({first_line(e)}); pass a torchvision .pth or a "
                           f"timm .safetensors/.bin file.") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors; pass a torchvision .pth or a timm "
                           f".safetensors/.bin file.")
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file: an 8-byte header length, a JSON header (dtype, shape and byte range
    of each tensor), then the data."""
    data = path.read_bytes()
    bad = f"{path}: not a complete safetensors file"
    if len(data) < 8:
        raise WeightsError(f"{bad} ({len(data)} bytes).")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise WeightsError(f"{bad} (its header is not JSON).") from None
    base, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{bad} (the header's entry for {key} is malformed).") from None
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key} has dtype {info['dtype']}, which cityseg does not read.")
        if base + end > len(data):
            raise WeightsError(f"{bad} (truncated: {len(data)} bytes, tensor {key} ends at byte {base + end}).")
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= start <= end or min(shape, default=0) < 0 or end - start != size:
            raise WeightsError(f"{bad} (tensor {key}: bytes {start}-{end} cannot hold shape {shape}).")
        tensor = torch.frombuffer(bytearray(data[base + start:base + end]), dtype=dtype) if end > start else \
            torch.empty(0, dtype=dtype)
        out[key] = tensor.reshape(shape)
    return out


def load_encoder_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` for encoder ``name``: classifier keys dropped, every other key present with its
    shape (one line naming the file otherwise), floating tensors in fp32."""
    entry = ENCODERS[name]
    with torch.device("meta"):
        expected = entry.build().state_dict()
    state = {k: v for k, v in read_weight_file(path).items() if not k.startswith(entry.classifier)}
    # files saved before PyTorch 0.4.1 (torchvision's resnet18/34) have no BatchNorm step counts; BatchNorm
    # fills them in when they are absent
    check_weights(state, expected, path, f"{name} weights", optional=lambda k: k.endswith(".num_batches_tracked"))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, what: str,
                  optional: Callable[[str], bool] = lambda key: False) -> None:
    """Every key of ``expected`` in ``state`` with its shape, and nothing else (keys ``optional`` says yes to may
    be absent or extra); otherwise one line naming the file and the first key of each kind of mismatch."""
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected and not optional(k)]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing, first: {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, first: {unexpected[0]}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of another shape, first: {k} {tuple(state[k].shape)} instead of "
                        f"{tuple(expected[k].shape)}")
    if problems:
        raise WeightsError(f"{path}: not {what} ({'; '.join(problems)}); pass a file made for it.")


def main(argv: list[str]) -> int:
    """``python -m cityseg.models.weights NAME...``: fill the cache with these encoders' ImageNet files."""
    unknown = [n for n in argv if n not in ENCODERS]
    if not argv or unknown:
        print(f"usage: python -m cityseg.models.weights ENCODER... ({', '.join(ENCODERS)})", file=sys.stderr)
        return 2
    for name in argv:
        try:
            print(f"{name}: {resolve_weights(name, 'imagenet')}")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
