"""Multi-scale residual quantization (VAR style), spec tokenizer.md §3.2, and its VQ unit.

:class:`MultiScaleBase` holds the residual loop shared by :class:`MultiScaleVQ` (this file) and
:class:`xqtool.quantize.lfq.MultiScaleLFQ`. Per scale ``si`` with side ``pn`` (H = W = ``scales[-1]``)::

    r      = area(f_rest → pn)                     (f_rest itself at the last scale)
    idx    = lookup(r)                             [B, pn*pn] row-major
    h      = φ_si(bicubic(codes(idx) → H))         (no resize at the last scale)
    f_hat += m_b · h                               m_b = 1 iff si < n_scales[b] (quantizer dropout)
    f_rest -= h                                    (all samples)

Subclasses provide ``_prepare_input`` (e.g. BSQ's l2-normalisation), ``lookup`` and ``codes``. Every
multi-scale branch is a :class:`~xqtool.quantize.base.MultiScaleUnit`: ``indices_to_var_input`` (teacher
forcing) and ``var_step`` (one sampling step) are what VAR needs.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from xqtool.errors import ConfigError
from xqtool.quantize.base import BranchQuantizer, Codebook, QuantOut, check_index_list, straight_through
from xqtool.quantize.phi import PhiBank


def area_resize(x: Tensor, pn: int) -> Tensor:
    """Adaptive-average-pool ``[B, D, h, w]`` to ``[B, D, pn, pn]`` (torch ``interpolate(mode='area')``)."""
    if x.shape[-1] == pn and x.shape[-2] == pn:
        return x
    return F.interpolate(x, size=(pn, pn), mode="area")


def bicubic_up(x: Tensor, side: int) -> Tensor:
    """Bicubic resize ``[B, D, pn, pn]`` → ``[B, D, side, side]`` (a = −0.75, align_corners False, no antialias)."""
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


class MultiScaleBase(BranchQuantizer):
    """Residual multi-scale quantizer skeleton (see module docstring).

    Args (beyond :class:`~xqtool.quantize.base.BranchQuantizer`'s): ``share_quant_resi`` (number of φ,
    0 = one per scale) and ``quant_resi`` (φ's residual ratio r). Raises ConfigError with fewer than two scales.

    Attributes:
        quant_resi: :class:`PhiBank` of φ convs (``quant_resi.qresi_ls.{k}``).
        ema_vocab_hit_SV: ``[S, K]`` persistent EMA of per-scale code hits (training only).
    """

    #: divide the commitment loss by S after the loop (LFQ does, VectorQuantizer2 does not)
    _commit_div_by_scales = False

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        scales: Sequence[int],
        side: int,
        *,
        l2_norm: bool = True,
        beta: float = 0.25,
        share_quant_resi: int = 4,
        quant_resi: float = 0.5,
    ) -> None:
        super().__init__(codebook_size, dim, scales, side, l2_norm=l2_norm, beta=beta)
        if len(self.scales) < 2:
            raise ConfigError("multi-scale quantizers need at least two scales; use VectorQuantizer for one")
        self.quant_resi = PhiBank(self.dim, len(self.scales), share_quant_resi, quant_resi)

    # ---- hooks -------------------------------------------------------------------------------
    def _prepare_input(self, f: Tensor) -> Tensor:
        """Map the fp32 input ``[B, D, H, W]`` to the vector being quantized (identity here)."""
        return f

    @abstractmethod
    def lookup(self, r: Tensor, si: int) -> Tensor:
        """Indices ``[B, pn*pn]`` of the (downsampled) residual ``r: [B, D, pn, pn]``."""

    def _entropy_term(self, f: Tensor, f_hat: Tensor, keep: Tensor, si: int) -> Optional[Tensor]:
        """Entropy regulariser of scale ``si`` (LFQ only); None when there is none."""
        return None

    # ---- shared pieces -------------------------------------------------------------------------
    def _refine(self, code: Tensor, si: int) -> Tensor:
        """h = φ_si(bicubic-up(code)) — no resize at the last scale. ``[B,D,pn,pn]`` → ``[B,D,H,W]``."""
        if si != len(self.scales) - 1:
            code = bicubic_up(code, self.side)
        return self.quant_resi[si](code)

    # ---- training forward ----------------------------------------------------------------------
    def forward(self, z: Tensor, n_scales: Optional[Tensor] = None) -> QuantOut:
        """Quantize ``z: [B, D, H, W]``; ``n_scales: [B]`` = scales kept per sample (quantizer dropout).

        Returns :class:`QuantOut` with the straight-through ``[B, D, H, W]`` output, per-scale indices,
        losses (``vq``, ``commit``, ``entropy``) and per-scale ``usage`` / ``perplexity`` stats (training
        ``usage``: from the EMA hit counts ``ema_vocab_hit_SV``, :func:`~xqtool.quantize.base.ema_usage`).
        """
        self.check_input(z)
        S, B = len(self.scales), z.shape[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            f = self._prepare_input(z.float())
            f0 = f.detach()
            f_rest = f0.clone()
            f_hat = torch.zeros_like(f0)
            if n_scales is None:
                n_scales = torch.full((B,), S, dtype=torch.long, device=z.device)
            n_scales = n_scales.to(device=z.device)
            zero = f.new_zeros(())
            vq, commit, entropy = zero, zero, zero
            indices: List[Tensor] = []
            usage, perplexity = [], []
            for si, pn in enumerate(self.scales):
                keep = si < n_scales  # [B] bool
                m = keep.to(f.dtype).view(B, 1, 1, 1)
                ratio = m.mean().clamp_min(1.0 / max(B, 1))
                idx = self.lookup(area_resize(f_rest, pn), si)
                h = self._refine(self.codes(idx, si), si)
                ent = self._entropy_term(f, f_hat, keep, si)
                if ent is not None:
                    entropy = entropy + ent / ratio
                f_hat = f_hat + m * h
                f_rest = f_rest - h.detach()
                vq = vq + (m * (f_hat - f0).square()).mean() / ratio
                commit = commit + (m * (f_hat.detach() - f).square()).mean() * (self.beta / ratio)
                indices.append(idx)
                u, p = self.usage_stats(idx, si, B)
                usage.append(u)
                perplexity.append(p)
            vq = vq / S
            entropy = entropy / S
            if self._commit_div_by_scales:
                commit = commit / S
            out = straight_through(f_hat, f)
        loss: Dict[str, Tensor] = {"vq": vq, "commit": commit, "entropy": entropy}
        stats = {"usage": torch.stack(usage).detach(), "perplexity": torch.stack(perplexity).detach()}
        return QuantOut(quantized=out, indices=indices, loss=loss, stats=stats)

    # ---- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_indices(self, z: Tensor) -> List[Tensor]:
        """Inference indices of ``z: [B, D, H, W]``: one ``[B, pn*pn]`` long tensor per scale."""
        self.check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            f_rest = self._prepare_input(z.float()).clone()
            out: List[Tensor] = []
            for si, pn in enumerate(self.scales):
                idx = self.lookup(area_resize(f_rest, pn), si)
                if si != len(self.scales) - 1:
                    f_rest = f_rest - self._refine(self.codes(idx, si), si)
                out.append(idx)
        return out

    @torch.no_grad()
    def indices_to_fhat(self, indices: Sequence[Tensor], cumulative: bool = False) -> Union[Tensor, List[Tensor]]:
        """Rebuild f_hat ``[B, D, H, W]`` from per-scale indices (spec §2.7 step 6).

        With ``cumulative`` returns the list (one per scale) of f_hat after each scale.
        Raises :class:`xqtool.errors.TokenError` on a wrong count, shape or index range.
        """
        B = check_index_list(indices, self.scales, self.codebook_size)
        device = indices[0].device
        f_hat = torch.zeros(B, self.dim, self.side, self.side, device=device)
        steps: List[Tensor] = []
        for si, idx in enumerate(indices):
            f_hat = f_hat + self._refine(self.codes(idx.long(), si), si)
            if cumulative:
                steps.append(f_hat.clone())
        return steps if cumulative else f_hat

    # ---- VAR interface -------------------------------------------------------------------------
    @torch.no_grad()
    def indices_to_var_input(self, indices: Sequence[Tensor]) -> Tensor:
        """VAR teacher-forcing inputs ``[B, L − scales[0]², D]`` (var.md §3).

        For si = 0..S−2: f_hat += φ(bicubic-up(codes_si)); emit area(f_hat → scales[si+1]) flattened
        row-major to ``[B, pn², D]``; concatenated over si.
        """
        B = check_index_list(indices, self.scales, self.codebook_size)
        f_hat = torch.zeros(B, self.dim, self.side, self.side, device=indices[0].device)
        chunks: List[Tensor] = []
        for si in range(len(self.scales) - 1):
            f_hat = f_hat + self._refine(self.codes(indices[si].long(), si), si)
            nxt = area_resize(f_hat, self.scales[si + 1])
            chunks.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(chunks, dim=1)

    @torch.no_grad()
    def var_step(self, si: int, f_hat: Tensor, codes: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """One sampling step: ``f_hat [B,D,H,W] += φ(bicubic-up(codes [B,D,pn,pn]))``.

        Returns ``(f_hat, area(f_hat → scales[si+1]))`` with the next input ``[B, D, pn', pn']``, or
        ``(f_hat, None)`` at the last scale (no resize there).
        """
        f_hat = f_hat + self._refine(codes.float(), si)
        if si == len(self.scales) - 1:
            return f_hat, None
        return f_hat, area_resize(f_hat, self.scales[si + 1])


class MultiScaleVQ(MultiScaleBase):
    """Multi-scale residual VQ (VectorQuantizer2 of the spec, §3.2).

    Search: cosine similarity between the l2-normalised residual and the l2-normalised codebook
    (``l2_norm``; squared-L2 otherwise), ONE matrix product per scale, ties → lowest index.
    Code vectors are the RAW codebook rows. Losses: vq divided by S, commit not (reference behaviour).

    State dict: ``embedding.weight`` ``[K, D]``, ``quant_resi.qresi_ls.{k}.weight/bias``,
    ``ema_vocab_hit_SV`` ``[S, K]``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of :class:`MultiScaleBase`; adds the learned codebook ``embedding``."""
        super().__init__(*args, **kwargs)
        self.embedding = Codebook(self.codebook_size, self.dim, self.l2_norm)

    def _search_codebook(self) -> Tuple[Tensor, Tensor]:
        """(codebook used by the search ``[D, K]``, squared row norms ``[K]``), cached in eval mode."""

        def compute() -> Tuple[Tensor, Tensor]:
            wf = self.embedding.weight.detach().float()
            if self.l2_norm:
                return F.normalize(wf, dim=1).t().contiguous(), wf.new_empty(0)
            return wf.t().contiguous(), wf.square().sum(dim=1)

        return self.embedding.cached(compute)

    def lookup(self, r: Tensor, si: int) -> Tensor:  # noqa: D102
        B, D, pn, _ = r.shape
        x = r.detach().permute(0, 2, 3, 1).reshape(-1, D)
        cb, sq = self._search_codebook()
        if self.l2_norm:
            idx = torch.argmax(F.normalize(x, dim=1) @ cb, dim=1)
        else:
            d = torch.addmm(x.square().sum(dim=1, keepdim=True) + sq, x, cb, alpha=-2, beta=1)
            idx = torch.argmin(d, dim=1)
        return idx.view(B, pn * pn)

    def codes(self, idx: Tensor, si: int) -> Tensor:  # noqa: D102
        pn = self.scales[si]
        return self.embedding.weight.float()[idx].view(idx.shape[0], pn, pn, self.dim).permute(0, 3, 1, 2)
