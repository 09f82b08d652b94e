"""Pretrained encoder weights: ``--encoder-weights imagenet|none|PATH``.

``imagenet`` fetches the encoder's official file once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``,
by default ``~/.cache/torch/hub/checkpoints``) and checks its SHA-256 before renaming it into place; a download
that gets no data for 30 s (``CITYSEG_DOWNLOAD_TIMEOUT_S`` sets another wait) is given up with one line, leaving
nothing behind. A node without internet uses a filled cache (``python -m cityseg.models.weights resnet50 ...`` on
a machine with internet, then copy the files) or a ``PATH``. A ``PATH`` is a torchvision ``.pth``, or a timm
``.safetensors`` or ``.bin``, read without running code (``weights_only``; safetensors is plain data, mapped rather
than read). Classifier keys are dropped; anything else missing or
unexpected, or a file that is not what it claims, is one line naming the file.

    python -m cityseg.models.weights resnet50 convnext_tiny   # fill the cache, print where each file is
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import mmap
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError, first_line
from .registry import ENCODERS

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
#: How long a download may go without data before it is given up (CITYSEG_DOWNLOAD_TIMEOUT_S overrides it).
DOWNLOAD_TIMEOUT_S = 30.0
#: The largest header safetensors itself reads (its Rust reader's limit).
SAFETENSORS_MAX_HEADER = 100_000_000


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
        if path.is_dir():
            raise WeightsError(f"--encoder-weights {option}: is a directory; pass the weight file in it (a "
                               f"torchvision .pth or a timm .safetensors/.bin file), imagenet, or none.")
        if not path.is_file():
            raise WeightsError(f"--encoder-weights {option}: no such file; pass a torchvision .pth or timm "
                               f".safetensors/.bin file, imagenet, or none.")
        return path
    official = ENCODERS[name].imagenet
    path = cache_path(name)
    if not path.is_file():
        make_cache_dir(path.parent)
        download(official.url, path, official.sha256, name)
    check_sha256(path, official.sha256)
    return path


def make_cache_dir(directory: Path) -> None:
    """Create the weights cache, or say which variable points it somewhere it cannot be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        var = next((v for v in ("TORCH_HOME", "XDG_CACHE_HOME") if os.environ.get(v)), None)
        named = f"{var}={os.environ[var]}" if var else "the torch hub cache"
        blocker = next((p for p in (directory, *directory.parents) if p.exists()), directory)
        why = f"{blocker} is a file, not a directory" if not blocker.is_dir() else e.strerror or first_line(e)
        fix = f"point {var} at a directory" if var else "fix that path"
        raise WeightsError(f"{named}: cannot create the weights cache {directory} ({why}); {fix}, or pass the "
                           f"weight file's path with --encoder-weights.") from None


def download_timeout() -> float:
    """Seconds a download may go without data: ``CITYSEG_DOWNLOAD_TIMEOUT_S``, else 30."""
    text = os.environ.get("CITYSEG_DOWNLOAD_TIMEOUT_S", "").strip()
    if not text:
        return DOWNLOAD_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise WeightsError(f"CITYSEG_DOWNLOAD_TIMEOUT_S={text}: must be a number of seconds > 0; unset it for "
                           f"the default {DOWNLOAD_TIMEOUT_S:g}.")
    return value


def download(url: str, path: Path, sha256: str, name: str) -> None:
    """Fetch ``url`` into a temp file next to ``path``, check its SHA-256, then rename it into place; a stall,
    a refusal, an HTTP error or another file removes the temp file and is one line saying how to fill the
    cache by hand."""
    timeout = download_timeout()
    by_hand = (f"on a machine with internet, download {url} and copy it to {path} (or run `python -m "
               f"cityseg.models.weights {name}` there and copy the file), or pass the file's path with "
               f"--encoder-weights")
    print(f"fetching {url} into {path}", file=sys.stderr, flush=True)
    tmp, received = None, 0
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read1(1 << 20), b""):  # what has come; read() would wait for 1 MiB
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if not digest.hexdigest().startswith(sha256):
            raise WeightsError(f"--encoder-weights imagenet: the download of {url} is not the official file (SHA-256 "
                               f"{digest.hexdigest()[:16]}... instead of {sha256[:16]}...); {by_hand}.")
        os.replace(tmp, path)
        tmp = None
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors; so are timeouts
        raise WeightsError(f"--encoder-weights imagenet: the download of {url} {download_failure(e, timeout, received)}"
                           f"; {by_hand}.") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def download_failure(e: BaseException, timeout: float, received: int) -> str:
    """What went wrong with a download, as the end of a sentence that starts "the download of URL"."""
    if isinstance(e, urllib.error.HTTPError):
        return f"failed: the server answered HTTP {e.code} {e.reason}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):  # socket.timeout, on connecting or on a read
        after = f" after {received} bytes" if received else ""
        return f"stalled{after}: no data for {timeout:g} s (CITYSEG_DOWNLOAD_TIMEOUT_S sets the wait)"
    if isinstance(reason, ConnectionRefusedError):
        return "failed: connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return f"failed: {reason.strerror}"
    return f"failed ({first_line(reason) if isinstance(reason, BaseException) else reason})"


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
        raise WeightsError(f"{path}: not a readable weight file ({unreadable(path, e, 'a torch or safetensors file')}"
                           f"); pass a torchvision .pth or a timm .safetensors/.bin file.") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors; pass a torchvision .pth or a timm "
                           f".safetensors/.bin file.")
    return state


def unreadable(path: Path, e: BaseException, formats: str = "a torch file") -> str:
    """What a file ``torch.load(weights_only=True)`` refused is, in a few words. Torch's own message is never passed
    on: for most such files it advises ``weights_only=False``, which would run code from the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except IsADirectoryError:
        return "a directory, not a file"
    except OSError as oe:
        return oe.strerror or type(oe).__name__
    if not head:
        return "an empty file"
    if not head.strip(b"\0"):
        return f"filled with zero bytes, not {formats}"
    if head.startswith(b"PK\x03\x04") and "weights_only" in str(e):
        return "a torch file of Python objects, not of plain tensors; cityseg does not load those, as that can run code"
    if is_text(head):
        return f"a text file, not {formats}"
    if head.startswith(b"PK\x03\x04"):  # torch's zip format; torch's words for a cut one are "[Errno 22]" and such
        return "a truncated or damaged torch file"
    return "not a torch file of plain tensors"


def is_text(head: bytes) -> bool:
    """Whether the first bytes of a file read as UTF-8 text."""
    for cut in range(4 if len(head) == 4096 else 1):  # a full read may end inside a character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c.isspace() for c in text)
    return False


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file: an 8-byte header length, a JSON header (dtype, shape and byte range
    of each tensor), then the data. The header and every byte range are checked against the file's size
    before anything else is read, and the data is mapped, not read: a large wrong file costs no memory."""
    bad = f"{path}: not a complete safetensors file"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{bad} ({size} bytes).")
        n = int.from_bytes(f.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise WeightsError(f"{bad} (its first 8 bytes give a header of {n} bytes, but the file has {size} "
                               f"bytes{' and safetensors allows 100 MB' if n > SAFETENSORS_MAX_HEADER else ''}).")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise WeightsError(f"{bad} (its header is not JSON).") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{bad} (its header is not a JSON object).")
        base, layout = 8 + n, {}
        for key, info in header.items():
            if key != "__metadata__":
                layout[key] = tensor_layout(path, key, info, base, size)
        # a private copy-on-write map: writable (torch.frombuffer wants that) without touching the file
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if any(c for _, c, _ in layout.values()) else None
    out = {}
    for key, (dtype, count, shape) in layout.items():
        start = base + int(header[key]["data_offsets"][0])
        tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=start) if count else \
            torch.empty(0, dtype=dtype)
        out[key] = tensor.reshape(shape)
    return out


def tensor_layout(path: Path, key: str, info: object, base: int, size: int) -> tuple[torch.dtype, int, list[int]]:
    """The dtype, element count and shape of one tensor of a safetensors header, its byte range checked
    against its shape and against the file's ``size``."""
    bad = f"{path}: not a complete safetensors file"
    try:
        start, end = (int(v) for v in info["data_offsets"])  # type: ignore[index]
        shape = [int(d) for d in info["shape"]]  # type: ignore[index]
        name = info["dtype"]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{bad} (the header's entry for {key} is malformed).") from None
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise WeightsError(f"{path}: tensor {key} has dtype {name}, which cityseg does not read.")
    if base + end > size:
        raise WeightsError(f"{bad} (truncated: {size} bytes, tensor {key} ends at byte {base + end}).")
    count = math.prod(shape)
    if not 0 <= start <= end or min(shape, default=0) < 0 or end - start != count * dtype.itemsize:
        raise WeightsError(f"{bad} (tensor {key}: bytes {start}-{end} cannot hold shape {shape}).")
    return dtype, count, shape


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
