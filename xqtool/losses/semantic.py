"""Semantic (and detail) distillation against a frozen teacher (spec §5.2, §5.3).

The teacher feature (CLS token ``[B, E]`` for guide type ``class``; patch tokens ``[B, N, E]`` for
``patch``, transposed properly to ``[B, E, h, w]``) is projected to the codebook dimension D by the
tokenizer's own trainable ``quant_conv`` (E→D, 1×1) when its input width matches E, otherwise by a
trainable 1×1 projection owned by :class:`SemanticDistillLoss` (the CNN-encoder case, the
reference's ``sem_linear``), and spatially averaged to ``t: [B, D]``. The student is the spatial
mean of the semantic branch output ``s: [B, D]``. The loss is the CLIP-style symmetric InfoNCE
over the global batch (features gathered with gradient when ``torch.distributed`` is initialised;
a plain single-process path otherwise), computed in fp32 with autocast off. The first ``n_drop``
samples of the batch (quantizer-dropout samples, spec §3.4) are excluded.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` ``[b, D]`` from all ranks along dim 0 (gradient flows back to every rank).

    Single process (or torch.distributed not initialised): returns `x` unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


def clip_infonce(student: Tensor, teacher: Tensor, scale: float = 1.0, normalize: bool = False) -> Tensor:
    """Symmetric InfoNCE between matched rows of `student` and `teacher` (both ``[B, D]``).

    logits = scale · T_all · S_allᵀ (``[B_all, B_all]``), labels = arange(B_all);
    loss = ½(CE(logits, labels) + CE(logitsᵀ, labels)). fp32, autocast disabled.
    Returns a scalar; 0 (attached to the graph) when the batch is empty.
    """
    device_type = student.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        s = student.float()
        t = teacher.float()
        if normalize:
            s = F.normalize(s, dim=-1)
            t = F.normalize(t, dim=-1)
        s_all = _gather_with_grad(s)
        t_all = _gather_with_grad(t)
        if s_all.shape[0] == 0:
            return student.sum() * 0.0 + teacher.sum() * 0.0
        logits = scale * t_all @ s_all.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def semantic_scale(epoch: int, clip_norm: bool, base_scale: float = 1.0, ramp_epochs: int = 200, max_scale: float = 100.0) -> float:
    """Logit scale of the InfoNCE (spec §5.2).

    clip_norm false: fixed `base_scale`. clip_norm true: linear ramp from `base_scale` to `max_scale`
    over `ramp_epochs` epochs ((epoch mod ramp)/ramp·(max − s₀) + s₀), then `max_scale`.
    """
    if not clip_norm:
        return float(base_scale)
    if epoch >= ramp_epochs:
        return float(max_scale)
    return (epoch % ramp_epochs) / ramp_epochs * (max_scale - base_scale) + base_scale


def teacher_to_map(feat: Tensor) -> Tensor:
    """Teacher feature to a ``[B, E, h, w]`` map.

    ``[B, E]`` (CLS) → ``[B, E, 1, 1]``; ``[B, N, E]`` (patch tokens, N a square) → transposed to
    ``[B, E, √N, √N]`` (the reference's no-transpose reshape is a defect, spec §9.5);
    ``[B, E, h, w]`` is returned as is.
    """
    if feat.dim() == 2:
        return feat[:, :, None, None]
    if feat.dim() == 3:
        b, n, e = feat.shape
        side = int(round(n**0.5))
        if side * side != n:
            # Not a square grid: a 1×N map gives the same spatial mean.
            return feat.transpose(1, 2).reshape(b, e, 1, n)
        return feat.transpose(1, 2).reshape(b, e, side, side)
    if feat.dim() == 4:
        return feat
    raise ValueError(f"teacher feature must be [B,E], [B,N,E] or [B,E,h,w], got {tuple(feat.shape)}")


class SemanticDistillLoss(nn.Module):
    """InfoNCE distillation of one tokenizer branch towards a frozen teacher feature.

    Args:
        teacher_dim: E, width of the teacher feature.
        embed_dim: D, width of the branch output.
        own_projection: when True, the loss owns a trainable 1×1 projection E→D (``self.proj``) used
            instead of the tokenizer's ``quant_conv`` (needed when quant_conv's input width is not E,
            e.g. CNN encoders). Its parameters must go into the generator optimizer.
        normalize: l2-normalise both features (``clip_norm``).
    """

    def __init__(self, teacher_dim: int, embed_dim: int, own_projection: bool = False, normalize: bool = False) -> None:
        super().__init__()
        self.teacher_dim = teacher_dim
        self.embed_dim = embed_dim
        self.normalize = normalize
        self.proj: Optional[nn.Conv2d] = nn.Conv2d(teacher_dim, embed_dim, 1) if own_projection else None

    @staticmethod
    def needs_own_projection(quant_conv: Optional[nn.Module], teacher_dim: int, embed_dim: int) -> bool:
        """True when `quant_conv` cannot project a teacher feature of width `teacher_dim` to `embed_dim`."""
        if not isinstance(quant_conv, nn.Conv2d):
            return True
        return quant_conv.in_channels != teacher_dim or quant_conv.out_channels != embed_dim

    def project(self, teacher_feat: Tensor, quant_conv: Optional[nn.Module]) -> Tensor:
        """Teacher feature (``[B,E]``/``[B,N,E]``/``[B,E,h,w]``) → ``[B, D]``."""
        fmap = teacher_to_map(teacher_feat)
        proj = self.proj if self.proj is not None else quant_conv
        if proj is None:
            raise RuntimeError("SemanticDistillLoss needs quant_conv or its own projection")
        w = proj.weight
        out = proj(fmap.to(w.dtype))
        return out.mean(dim=(2, 3))

    def forward(
        self,
        student_map: Tensor,
        teacher_feat: Tensor,
        quant_conv: Optional[nn.Module] = None,
        n_drop: int = 0,
        scale: float = 1.0,
    ) -> Tensor:
        """Loss (scalar).

        Args:
            student_map: branch output ``[B, D, H, W]`` (straight-through, with gradient).
            teacher_feat: frozen teacher feature for the same images (``[B,E]`` or ``[B,N,E]``).
            quant_conv: the tokenizer's shared E→D 1×1 conv (gradient flows into it).
            n_drop: the first `n_drop` samples are quantizer-dropout samples and are skipped.
            scale: InfoNCE logit scale (:func:`semantic_scale`).
        """
        s = student_map[n_drop:].float().mean(dim=(2, 3))
        t = self.project(teacher_feat[n_drop:].detach(), quant_conv).float()
        return clip_infonce(s, t, scale=scale, normalize=self.normalize)


__all__ = ["SemanticDistillLoss", "clip_infonce", "semantic_scale", "teacher_to_map"]
