"""Mixed precision: which autocast dtype ``--amp`` means on a device, and the autocast context for it."""

from __future__ import annotations

import contextlib

import torch


def has_bf16_units(capability: tuple[int, int]) -> bool:
    """True for GPUs with bfloat16 tensor cores (compute capability 8.0 and up: A100, L40S, H100, ...).

    ``torch.cuda.is_bf16_supported()`` also says True on a V100 or T4, where bf16 is emulated and slow."""
    return capability >= (8, 0)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (None = full precision). ``auto``: bf16 on GPUs with bf16 units, fp16
    (with a GradScaler) on older GPUs, full precision on CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if has_bf16_units(torch.cuda.get_device_capability(device)) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or nothing when running in full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
