"""Softmax cross-entropy with a one-pass backward, for large vocabularies (VAR's P·K-way heads).

``F.cross_entropy`` differentiates through ``log_softmax`` and ``nll_loss`` as two autograd nodes: the
backward writes a dense one-hot gradient, then a second full pass turns it into ``softmax − one-hot``.
:func:`softmax_cross_entropy` computes the same value and the same gradient in closed form,
``∂L/∂z = (softmax(z) − (1−ε)·onehot(t) − ε/K) · ḡ/N`` (label smoothing ε, Szegedy et al. 2016), from
the saved log-probabilities: one exp pass and one scaling pass over the ``[N, K]`` logits.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
        if label_smoothing > 0:
            nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
        ctx.save_for_backward(logp, target)
        ctx.label_smoothing = label_smoothing
        return nll.mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:
        logp, target = ctx.saved_tensors
        n, k = logp.shape
        eps = ctx.label_smoothing
        g = logp.exp()  # softmax (a new buffer: the saved log-probabilities stay intact for a retained graph)
        if eps > 0:
            g.sub_(eps / k)
        g.scatter_add_(1, target.unsqueeze(1), g.new_full((n, 1), -(1.0 - eps)))
        return g.mul_(grad / n), None, None


def softmax_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean softmax cross-entropy, the value and gradient of ``F.cross_entropy(logits, target, label_smoothing=ε)``.

    logits ``[N, K]`` (float), target ``[N]`` int64 class indices in ``[0, K)`` → scalar. The gradient flows
    to ``logits`` only. Raises ``ValueError`` for other shapes, a non-integer target or ε outside [0, 1], and
    ``RuntimeError`` for indices out of range (from ``gather``).
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"softmax_cross_entropy wants logits [N, K] and target [N], got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"softmax_cross_entropy wants integer class indices, got {target.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return _SoftmaxCrossEntropy.apply(logits, target.long(), float(label_smoothing))


__all__ = ["softmax_cross_entropy"]
