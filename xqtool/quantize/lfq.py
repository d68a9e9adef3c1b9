"""Multi-scale residual LFQ / BSQ (spec tokenizer.md §3.3).

No learnable codebook: K = 2**D. At every position of a scale, channel k gives bit k (LSB = channel 0),
bit = 1 iff the (downsampled) residual is > 0; index = Σ_k bit_k·2^k. The code vector of an index is
``+scaler[si]`` on set bits and ``−scaler[si]`` elsewhere. With ``l2_norm`` (BSQ) the input is first
l2-normalised over channels (projection to the unit sphere, gradient through it) and
``scaler[si] = scale**si / sqrt(D)``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xqtool.errors import ConfigError
from xqtool.quantize.multiscale import MultiScaleBase


def _binary_entropy(p: Tensor) -> Tensor:
    """H(p, 1−p) elementwise with the reference's ``log(q + 1e-8)``."""
    return -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))


class MultiScaleLFQ(MultiScaleBase):
    """Multi-scale residual lookup-free quantizer (LFQ; BSQ when ``l2_norm``).

    Losses: vq, commit and entropy are all divided by S (reference behaviour). Entropy (when
    ``entropy_weight`` ≠ 0) on ``x = f − sg[f_hat before the scale]`` at full resolution, kept samples only:
    soft (analytical per-bit) or MaskGIT-style over all K codes (temperature 0.01).

    State dict: ``ema_vocab_hit_SV`` ``[S, K]``, ``scaler`` ``[S]``, ``quant_resi.qresi_ls.{k}.weight/bias``.
    Non-persistent: ``mask`` ``[D]`` powers of two, ``codebook`` ``[K, D]`` of ±1.
    """

    _commit_div_by_scales = True

    def __init__(self, codebook_size: int, dim: int, scales: Sequence[int], side: int, *, scale: float = 1.0,
                 entropy_weight: float = 0.0, soft_entropy: bool = True, **options: Any) -> None:
        """``options``: ``l2_norm`` (BSQ), ``beta``, ``share_quant_resi``, ``quant_resi`` of :class:`MultiScaleBase`.
        Raises ConfigError unless ``codebook_size == 2**dim`` and ``dim <= 30``."""
        if int(codebook_size) != 2 ** int(dim):
            raise ConfigError(
                f"LFQ/BSQ needs codebook_size == 2**codebook_embed_dim; got K={codebook_size}, D={dim} "
                f"(set quant.codebook_size={2 ** int(dim)})"
            )
        if int(dim) > 30:
            raise ConfigError(f"LFQ/BSQ codebook_embed_dim {dim} too large (2**D codes); use D <= 30")
        super().__init__(codebook_size, dim, scales, side, **options)
        self.entropy_weight = float(entropy_weight)
        self.soft_entropy = bool(soft_entropy)
        S = len(self.scales)
        scaler = torch.tensor([float(scale) ** si for si in range(S)], dtype=torch.float32)
        if self.l2_norm:
            scaler = scaler / (self.dim ** 0.5)
        self.register_buffer("scaler", scaler)
        mask = 2 ** torch.arange(self.dim, dtype=torch.long)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("codebook", self.bits_to_codes(self.indices_to_bits(torch.arange(codebook_size))),
                             persistent=False)

    # ---- bit conventions -------------------------------------------------------------------------
    def indices_to_bits(self, idx: Tensor) -> Tensor:
        """Bits ``[..., D]`` (bool, channel k = bit k) of indices ``[...]``."""
        return (idx.long().unsqueeze(-1) & self.mask) != 0

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """Indices ``[...]`` of bits ``[..., D]`` (bool or 0/1)."""
        return (bits.long() * self.mask).sum(dim=-1)

    @staticmethod
    def bits_to_codes(bits: Tensor) -> Tensor:
        """±1 values ``[..., D]`` of bits."""
        return bits.float() * 2 - 1

    # ---- hooks -------------------------------------------------------------------------------
    def _prepare_input(self, f: Tensor) -> Tensor:  # noqa: D102
        return F.normalize(f, dim=1, eps=1e-12) if self.l2_norm else f

    def lookup(self, r: Tensor, si: int) -> Tensor:  # noqa: D102
        B, D, pn, _ = r.shape
        bits = (r.detach() > 0).long()  # [B, D, pn, pn]
        return (bits * self.mask.view(1, D, 1, 1)).sum(dim=1).view(B, pn * pn)

    def codes(self, idx: Tensor, si: int) -> Tensor:  # noqa: D102
        pn = self.scales[si]
        s = self.scaler[si].float()
        bits = self.indices_to_bits(idx)  # [B, pn*pn, D]
        vals = torch.where(bits, s, -s)
        return vals.view(idx.shape[0], pn, pn, self.dim).permute(0, 3, 1, 2)

    def _entropy_term(self, f: Tensor, f_hat: Tensor, keep: Tensor, si: int) -> Optional[Tensor]:  # noqa: D102
        if self.entropy_weight == 0 or not bool(keep.any()):
            return None
        x = (f - f_hat.detach())[keep]  # [B', D, H, W]
        x = x.flatten(2).transpose(1, 2).reshape(-1, self.dim)  # [B'·H·W, D]
        s = self.scaler[si].float()
        if self.soft_entropy:
            p = torch.sigmoid(-4 * x * s)  # [N, D]
            per_sample = _binary_entropy(p).sum(dim=1).mean()
            codebook_entropy = _binary_entropy(p.mean(dim=0)).sum()
        else:
            logits = 2 * (x @ self.codebook.t()) * s / 0.01  # [N, K]
            probs = logits.softmax(dim=1)
            per_sample = -(probs * logits.log_softmax(dim=1)).sum(dim=1).mean()
            avg = probs.mean(dim=0)
            codebook_entropy = -(avg * torch.log(avg + 1e-5)).sum()
        return (per_sample - codebook_entropy) * self.entropy_weight
