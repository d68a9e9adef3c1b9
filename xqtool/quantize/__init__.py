"""Quantizers: single-scale VQ, multi-scale residual VQ, multi-scale LFQ/BSQ, product quantization.

This package owns the quantizer contract (:mod:`xqtool.quantize.base`: the abstract
:class:`BranchQuantizer`, the :class:`MultiScaleUnit` and :class:`VARQuantizer` protocols, the result
dataclasses), the branch units (``vq``, ``multiscale``, ``lfq``, ``phi``), their factory, the product
quantizer (tokens ``[B, P, L]``) and the RobustTok perturbation. It imports only torch, numpy and
:mod:`xqtool.errors`; models and tasks import it, never the other way round.

>>> import torch
>>> from xqtool.quantize import build_branch_quantizer, ProductQuantizer
>>> pq = ProductQuantizer([build_branch_quantizer(codebook_size=64, dim=8, scales=(1, 2, 4), side=4)
...                        for _ in range(2)])
>>> pq.quantize([torch.randn(3, 8, 4, 4)] * 2).shape   # [B, P, L]
torch.Size([3, 2, 21])
"""

from xqtool.quantize.base import (
    BranchQuantizer,
    MultiScaleUnit,
    ProductQuantOut,
    QuantOut,
    VARQuantizer,
    as_multiscale,
)
from xqtool.quantize.factory import build_branch_quantizer
from xqtool.quantize.lfq import MultiScaleLFQ
from xqtool.quantize.multiscale import MultiScaleBase, MultiScaleVQ, area_resize, bicubic_up
from xqtool.quantize.perturb import perturb_latent, perturbation_schedule
from xqtool.quantize.phi import Phi, PhiBank, phi_index_table
from xqtool.quantize.product import ProductQuantizer
from xqtool.quantize.vq import VectorQuantizer

__all__ = [
    "BranchQuantizer",
    "MultiScaleUnit",
    "VARQuantizer",
    "as_multiscale",
    "QuantOut",
    "ProductQuantOut",
    "build_branch_quantizer",
    "VectorQuantizer",
    "MultiScaleBase",
    "MultiScaleVQ",
    "MultiScaleLFQ",
    "ProductQuantizer",
    "Phi",
    "PhiBank",
    "phi_index_table",
    "perturb_latent",
    "perturbation_schedule",
    "area_resize",
    "bicubic_up",
]
