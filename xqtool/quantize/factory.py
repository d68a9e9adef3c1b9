"""Factory: the branch quantizer class a configuration selects (spec tokenizer.md §3 table)."""

from __future__ import annotations

from typing import Sequence

from xqtool.quantize.base import BranchQuantizer
from xqtool.quantize.lfq import MultiScaleLFQ
from xqtool.quantize.multiscale import MultiScaleVQ
from xqtool.quantize.vq import VectorQuantizer


def build_branch_quantizer(
    *, codebook_size: int, dim: int, scales: Sequence[int], side: int, lfq: bool = False, l2_norm: bool = True,
    beta: float = 0.25, share_quant_resi: int = 4, entropy_weight: float = 0.0, soft_entropy: bool = True,
    scale: float = 1.0, quant_resi: float = 0.5,
) -> BranchQuantizer:
    """One branch quantizer: one scale → :class:`VectorQuantizer` (``lfq`` and the φ/entropy options unused);
    multi-scale → :class:`MultiScaleVQ`, or :class:`MultiScaleLFQ` when ``lfq`` (BSQ when ``l2_norm``).
    Raises ConfigError on invalid scales or LFQ sizes (see the classes)."""
    if len(tuple(scales)) == 1:
        return VectorQuantizer(codebook_size, dim, scales, side, l2_norm=l2_norm, beta=beta)
    common = dict(l2_norm=l2_norm, beta=beta, share_quant_resi=share_quant_resi, quant_resi=quant_resi)
    if lfq:
        return MultiScaleLFQ(codebook_size, dim, scales, side, scale=scale, entropy_weight=entropy_weight,
                             soft_entropy=soft_entropy, **common)
    return MultiScaleVQ(codebook_size, dim, scales, side, **common)
