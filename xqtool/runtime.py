"""Process-wide numeric settings shared by every task."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Dict, Optional

import torch

from xqtool.errors import ConfigError

AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Inference precision names (``--precision``) -> autocast dtype (None: plain float32)."""


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """Autocast dtype of an inference ``--precision`` (ConfigError for anything but fp32, bf16, fp16)."""
    if precision not in AMP_DTYPES:
        raise ConfigError(f"--precision must be fp32, bf16 or fp16, not {precision!r}")
    return AMP_DTYPES[precision]


def autocast(device: torch.device, precision: str) -> ContextManager:
    """``torch.autocast`` on `device` for `precision` (a no-op context for fp32)."""
    dtype = amp_dtype(precision)
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def configure_cpu_math() -> None:
    """Flush denormal floats to zero on CPU.

    Training drives some activations/optimizer states into the denormal range, where x86 CPUs run
    convolutions and matmuls 10-100x slower (measured: a tiny CNN step went from 9 s to 0.12 s).
    Flushing changes results only below ~1e-38.
    """
    torch.set_flush_denormal(True)


def fast_adamw_kwargs(device: torch.device) -> Dict[str, bool]:
    """Keyword arguments selecting torch's fastest AdamW kernel for parameters on `device`.

    ``{"fused": True}`` where torch has a fused AdamW for the device type (CUDA, and the CPU since
    torch 2.4: one pass over each parameter instead of a dozen elementwise kernels), else
    ``{"foreach": True}`` (multi-tensor). Both give the per-element update of the plain loop to float
    rounding (``tests/test_train_step_speed.py``).
    """
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        fused_ok = device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - older torch
        fused_ok = device.type == "cuda"
    return {"fused": True} if fused_ok else {"foreach": True}


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def configure_cpu_allocator() -> bool:
    """Keep freed training buffers in the process instead of handing them back to the OS (glibc only).

    glibc serves every allocation above 32 MB (an image batch through VGG, the VAR logits) with a fresh
    ``mmap`` and unmaps it on free, so each training step page-faults and zero-fills its big buffers again
    (about 1 M minor faults per MSVR10P2-4096 step on the CPU). With mmap off for malloc and no trimming,
    the next step reuses the same memory. Peak RSS stays about the same; memory is not returned to the OS
    until the process ends, which suits a training process. Set ``XQTOOL_MALLOC_TUNING=0`` to keep
    glibc's defaults. Returns True when the setting was applied.
    """
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("XQTOOL_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok)  # -1: never trim (mallopt(3))
