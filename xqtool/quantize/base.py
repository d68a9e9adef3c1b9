"""The one contract every quantizer in xqtool follows.

A *branch quantizer* (single-scale VQ, multi-scale residual VQ, multi-scale LFQ/BSQ) maps a latent
map ``z: [B, D, H, W]`` to a quantized map of the same shape plus per-scale integer indices.
Scales are listed coarse to fine (``scales = (1, 1, 2, 3, ..., H)``); a single-scale quantizer has
``scales == (H,)``. Indices of one scale are ``[B, pn*pn]`` in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from torch import Tensor


@dataclass
class QuantOut:
    """Result of a quantizer's training forward.

    Attributes:
        quantized: ``[B, D, H, W]`` straight-through output (value of the quantized map, gradient of
            identity to the input).
        indices: one ``[B, pn*pn]`` long tensor per scale, coarse to fine.
        loss: scalar loss terms: ``vq`` (codebook), ``commit`` (commitment, already times beta),
            ``entropy`` (LFQ/BSQ, already times its weight; 0 otherwise).
        stats: detached diagnostics: ``usage`` ``[S]`` fraction of codes hit in this batch per scale,
            ``perplexity`` ``[S]`` exp(entropy of the code histogram) per scale.
    """

    quantized: Tensor
    indices: List[Tensor]
    loss: Dict[str, Tensor]
    stats: Dict[str, Tensor] = field(default_factory=dict)
