"""Process-wide numeric settings shared by every task."""

from __future__ import annotations

from typing import Dict

import torch


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
