"""Single-scale vector quantizer (spec tokenizer.md §3.1).

Nearest-code search on ``z: [B, D, H, W]`` flattened to ``[B·H·W, D]``; with ``l2_norm`` both z and the
codebook rows are l2-normalised and the output vectors are the normalised codebook rows (unit vectors).
There is no φ and no scale pyramid (``scales == (H,)``), so there is no VAR interface.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from xqtool.errors import ConfigError
from xqtool.quantize.base import (
    CodebookCache,
    QuantOut,
    check_index_list,
    check_scales,
    code_histogram,
    ema_hit_update,
    ema_usage,
    histogram_stats,
    straight_through,
)


class VectorQuantizer(nn.Module):
    """Single-scale VQ. State dict: ``embedding.weight`` ``[K, D]``, ``ema_vocab_hit_SV`` ``[K]``.

    Losses: ``commit = beta·mean((sg[z_q] − z)²)``, ``vq = mean((z_q − sg[z])²)`` (z normalised when
    ``l2_norm``), ``entropy = 0``.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        scales: Sequence[int],
        side: int,
        *,
        l2_norm: bool = True,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        self.scales: Tuple[int, ...] = check_scales(scales, side)
        if len(self.scales) != 1:
            raise ConfigError(f"VectorQuantizer is single-scale; got scales {list(self.scales)}")
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.side = int(side)
        self.num_tokens = self.side * self.side
        self.l2_norm = bool(l2_norm)
        self.beta = float(beta)
        self.embedding = nn.Embedding(self.codebook_size, self.dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(self.codebook_size))
        self.record_hit = 0
        self._cache = CodebookCache()

    # ---- codebook --------------------------------------------------------------------------------
    def _codebook(self) -> Tensor:
        """Codebook rows used as code vectors ``[K, D]`` (normalised when ``l2_norm``), with grad."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=1) if self.l2_norm else w

    def _search_codebook(self) -> Tuple[Tensor, Tensor]:
        """(``[K, D]`` codebook, ``[K]`` squared norms) without grad; cached in eval mode."""

        def compute() -> Tuple[Tensor, Tensor]:
            cb = self._codebook().detach()
            return cb, cb.square().sum(dim=1)

        return self._cache.get(self.embedding.weight, compute, self.training)

    def train(self, mode: bool = True) -> "VectorQuantizer":  # noqa: D102
        self._cache.clear()
        return super().train(mode)

    def _check_input(self, z: Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.dim or z.shape[2] != self.side or z.shape[3] != self.side:
            raise ValueError(f"expected z of shape [B, {self.dim}, {self.side}, {self.side}], got {tuple(z.shape)}")

    def _flat(self, z: Tensor) -> Tensor:
        """``[B, D, H, W]`` → ``[B·H·W, D]`` (normalised when ``l2_norm``), sample-major then row-major."""
        x = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)
        return F.normalize(x, dim=1) if self.l2_norm else x

    def _search(self, x: Tensor) -> Tensor:
        """argmin of d = ‖x‖² + ‖e‖² − 2·x·eᵀ: ONE matrix product; ties → lowest index. ``[N]``."""
        cb, sq = self._search_codebook()
        x = x.detach()
        d = torch.addmm(x.square().sum(dim=1, keepdim=True) + sq, x, cb.t(), alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    # ---- contract ----------------------------------------------------------------------------------
    def forward(self, z: Tensor, n_scales: Optional[Tensor] = None) -> QuantOut:
        """Quantize ``z: [B, D, H, W]`` (``n_scales`` is ignored: one scale). See :class:`QuantOut`."""
        self._check_input(z)
        B = z.shape[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._flat(z)
            idx = self._search(x)
            zq = self._codebook()[idx]
            commit = self.beta * (zq.detach() - x).square().mean()
            vq = (zq - x.detach()).square().mean()
            out = straight_through(zq, x).view(B, self.side, self.side, self.dim).permute(0, 3, 1, 2)
            hist = code_histogram(idx, self.codebook_size, reduce=self.training)
            usage, perplexity = histogram_stats(hist)
            if self.training:
                with torch.no_grad():
                    ema_hit_update(self.ema_vocab_hit_SV, hist, self.record_hit)
                    usage = ema_usage(self.ema_vocab_hit_SV, B * self.side * self.side)
                self.record_hit += 1
        loss = {"vq": vq, "commit": commit, "entropy": vq.new_zeros(())}
        stats = {"usage": usage.view(1).detach(), "perplexity": perplexity.view(1).detach()}
        return QuantOut(quantized=out, indices=[idx.view(B, -1)], loss=loss, stats=stats)

    @torch.no_grad()
    def quantize(self, z: Tensor) -> List[Tensor]:
        """Inference indices: a one-element list with ``[B, H*W]`` (row-major)."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return [self._search(self._flat(z)).view(z.shape[0], -1)]

    def codes(self, idx: Tensor, si: int = 0) -> Tensor:
        """Code vectors ``[B, D, H, W]`` of ``idx: [B, H*W]`` (normalised rows when ``l2_norm``)."""
        cb = self._codebook() if self.training else self._search_codebook()[0]
        return cb[idx].view(idx.shape[0], self.side, self.side, self.dim).permute(0, 3, 1, 2)

    @torch.no_grad()
    def indices_to_fhat(self, indices: Sequence[Tensor], cumulative: bool = False) -> Union[Tensor, List[Tensor]]:
        """f_hat ``[B, D, H, W]`` of ``[idx [B, H*W]]`` (or ``[f_hat]`` when ``cumulative``)."""
        check_index_list(indices, self.scales, self.codebook_size)
        f_hat = self.codes(indices[0].long(), 0)
        return [f_hat] if cumulative else f_hat

    def var_input(self, indices: Sequence[Tensor]) -> Tensor:
        """Not available: raises ConfigError."""
        raise ConfigError("VAR needs a multi-scale tokenizer (quant.v_patch_nums with more than one scale)")

    def var_next(self, si: int, f_hat: Tensor, codes: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Not available: raises ConfigError."""
        raise ConfigError("VAR needs a multi-scale tokenizer (quant.v_patch_nums with more than one scale)")
