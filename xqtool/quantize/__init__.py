"""Quantizers: single-scale VQ, multi-scale residual VQ, multi-scale LFQ/BSQ, product quantization.

>>> import torch
>>> from xqtool.quantize import build_branch_quantizer, ProductQuantizer
>>> pq = ProductQuantizer([build_branch_quantizer(codebook_size=64, dim=8, scales=(1, 2, 4), side=4)
...                        for _ in range(2)])
>>> pq.quantize([torch.randn(3, 8, 4, 4)] * 2).shape   # [B, P, L]
torch.Size([3, 2, 21])
"""

from xqtool.quantize.base import ProductQuantOut, QuantOut
from xqtool.quantize.factory import build_branch_quantizer
from xqtool.quantize.lfq import MultiScaleLFQ
from xqtool.quantize.multiscale import MultiScaleBase, MultiScaleVQ, area_resize, bicubic_up
from xqtool.quantize.perturb import perturb_latent, perturbation_schedule
from xqtool.quantize.phi import Phi, PhiBank, phi_index_table
from xqtool.quantize.product import ProductQuantizer
from xqtool.quantize.vq import VectorQuantizer

__all__ = [
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
