"""RobustTok latent perturbation for the single-scale VQ path (spec tokenizer.md §3.6).

Applied after quantization, to the decoder input only (vq/commit losses come from the unperturbed
quantization). With the defaults alpha = beta = 0 it is a no-op.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from xqtool.quantize.base import straight_through
from xqtool.quantize.vq import VectorQuantizer


def perturbation_schedule(
    epoch: int, alpha: float, delta: int, anneal_start: int, anneal_end: int, end_ratio: float
) -> Tuple[float, int]:
    """(alpha_e, delta_e) of an epoch: ratio 1 before ``anneal_start``, ``1 − (e − start)/(end − start)·end_ratio``
    until ``anneal_end``, exactly ``end_ratio`` from then on (reference behaviour, as written)."""
    if epoch < anneal_start:
        ratio = 1.0
    elif epoch < anneal_end:
        ratio = 1.0 - (epoch - anneal_start) / max(anneal_end - anneal_start, 1) * end_ratio
    else:
        ratio = end_ratio
    return ratio * alpha, int(ratio * delta)


def perturb_latent(
    q: VectorQuantizer,
    z: Tensor,
    zq: Tensor,
    *,
    alpha: float,
    beta: float,
    delta: int,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Replace codes by random near neighbours for the first ⌊B·beta⌋ samples.

    Args:
        q: the single-scale quantizer that produced ``zq``.
        z: ``[B, D, H, W]`` encoder output (pre-quantization).
        zq: ``[B, D, H, W]`` straight-through quantized output of ``q(z)``.
        alpha: per-position probability of replacing the nearest code.
        beta: fraction of the batch (first samples) that receives the perturbation.
        delta: size of the neighbour set (the ``delta`` nearest codes; index 0 = nearest).

    Returns:
        ``[B, D, H, W]``: perturbed (straight-through w.r.t. the normalised z) for the first samples, ``zq`` else.
    """
    B = z.shape[0]
    nb = int(math.floor(B * beta))
    delta = min(int(delta), q.codebook_size)
    if nb == 0 or alpha <= 0 or delta <= 1:
        return zq
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = q.flatten(z[:nb])  # [nb·H·W, D]
        near = torch.topk(q.distances(x), delta, dim=1, largest=False).indices  # [N, delta], nearest first
        n = near.shape[0]
        dev = z.device if generator is None else generator.device
        flip = torch.rand(n, generator=generator, device=dev).to(z.device)
        pick = torch.randint(0, delta, (n,), generator=generator, device=dev).to(z.device)
        choice = torch.where(flip < alpha, pick, torch.zeros_like(pick))
        idx = near.gather(1, choice.view(-1, 1)).squeeze(1)
        pert = q.unflatten(straight_through(q.code_vectors()[idx], x))
    return torch.cat([pert.to(zq.dtype), zq[nb:]], dim=0)
