"""Inference-only linear layers with oneDNN pre-packed weights (CPU).

For frozen inference on the CPU, oneDNN can reorder a Linear weight once into its blocked GEMM layout and fuse
an activation (GELU) into the GEMM epilogue. On a 2-core AVX-512 machine the 17 blocks of a d17 VAR run their
linears + GELU about 13 % faster this way than through ``F.linear`` (MKL) followed by a separate ``F.gelu``,
because the weights are not re-laid-out on every call and the 4·C-wide hidden activations are not re-read
(``bench/sample.py``). The results are fp32 (or bf16) GEMMs like MKL's, with a different summation order, so
they agree with ``F.linear`` to rounding (about 1e-6 relative), not bit for bit.

This uses PyTorch's oneDNN operators (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``,
the ones ``torch.compile`` uses for frozen CPU models). Where they are missing (builds without oneDNN,
non-x86 CPUs) :func:`packing_available` is False and callers keep the plain modules.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["PackedLinear", "packing_available"]

_ACTIVATIONS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}


def packing_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """True when oneDNN pre-packed linears can run on `device` with `dtype` (CPU, fp32 or bf16)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """y = act(x·Wᵀ + b) with W packed once by oneDNN. Not an ``nn.Module``: it holds derived tensors only and
    never enters a state dict.

    Args:
        weight: [out, in] (detached; cast to `dtype`).
        bias: [out] or None.
        activation: None, ``"gelu_tanh"`` or ``"gelu"`` (erf), fused into the GEMM.
        dtype: compute dtype (fp32, or bf16 for autocast-like inference: inputs are cast, outputs are bf16).
        rows_hint: a typical number of input rows (only tunes oneDNN's choice of layout).
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                 dtype: torch.dtype = torch.float32, rows_hint: int = 256) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown fused activation {activation!r}; expected one of {sorted(map(str, _ACTIVATIONS))}")
        w = weight.detach().to(dtype).contiguous()
        self.out_features, self.in_features = w.shape
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, max(int(rows_hint), 1))
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.attr, self.algorithm = _ACTIVATIONS[activation]

    def __call__(self, x: Tensor) -> Tensor:
        """x [..., in] → [..., out] in the packed dtype."""
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)
