"""Single-scale vector quantizer (spec tokenizer.md §3.1).

Nearest-code search on ``z: [B, D, H, W]`` flattened to ``[B·H·W, D]``; with ``l2_norm`` both z and the
codebook rows are l2-normalised and the output vectors are the normalised codebook rows (unit vectors).
There is no φ and no scale pyramid (``scales == (H,)``), so it is not a :class:`~xqtool.quantize.base.MultiScaleUnit`
(VAR needs one).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from xqtool.errors import ConfigError
from xqtool.quantize.base import BranchQuantizer, Codebook, QuantOut, check_index_list, straight_through


class VectorQuantizer(BranchQuantizer):
    """Single-scale VQ. State dict: ``embedding.weight`` ``[K, D]``, ``ema_vocab_hit_SV`` ``[K]``.

    Losses: ``commit = beta·mean((sg[z_q] − z)²)``, ``vq = mean((z_q − sg[z])²)`` (z normalised when
    ``l2_norm``), ``entropy = 0``. Raises ConfigError unless ``scales`` has exactly one entry.
    """

    def __init__(
        self, codebook_size: int, dim: int, scales: Sequence[int], side: int, *, l2_norm: bool = True,
        beta: float = 0.25,
    ) -> None:
        super().__init__(codebook_size, dim, scales, side, l2_norm=l2_norm, beta=beta)
        if len(self.scales) != 1:
            raise ConfigError(f"VectorQuantizer is single-scale; got scales {list(self.scales)}")
        self.embedding = Codebook(self.codebook_size, self.dim, self.l2_norm)

    # ---- codebook and search (also used by the RobustTok perturbation) -----------------------------
    def code_vectors(self) -> Tensor:
        """Codebook rows used as code vectors ``[K, D]`` (normalised when ``l2_norm``), with grad."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=1) if self.l2_norm else w

    def _search_codebook(self) -> Tuple[Tensor, Tensor]:
        """(``[K, D]`` codebook, ``[K]`` squared norms) without grad; cached in eval mode."""

        def compute() -> Tuple[Tensor, Tensor]:
            cb = self.code_vectors().detach()
            return cb, cb.square().sum(dim=1)

        return self.embedding.cached(compute)

    def flatten(self, z: Tensor) -> Tensor:
        """``[B, D, H, W]`` → ``[B·H·W, D]`` fp32 (normalised when ``l2_norm``), sample-major then row-major."""
        x = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)
        return F.normalize(x, dim=1) if self.l2_norm else x

    def unflatten(self, x: Tensor) -> Tensor:
        """``[B·H·W, D]`` (or ``[B, H·W, D]``) → ``[B, D, H, W]`` (inverse layout of :meth:`flatten`)."""
        batch = x.numel() // (self.side * self.side * self.dim)
        return x.view(batch, self.side, self.side, self.dim).permute(0, 3, 1, 2)

    def distances(self, x: Tensor) -> Tensor:
        """Squared distances ``[N, K]`` of ``x: [N, D]`` (from :meth:`flatten`, detached) to the code vectors:
        d = ‖x‖² + ‖e‖² − 2·x·eᵀ in ONE matrix product."""
        cb, sq = self._search_codebook()
        x = x.detach()
        return torch.addmm(x.square().sum(dim=1, keepdim=True) + sq, x, cb.t(), alpha=-2, beta=1)

    def _search(self, x: Tensor) -> Tensor:
        """Nearest code ``[N]`` of ``x: [N, D]``; ties → lowest index."""
        return torch.argmin(self.distances(x), dim=1)

    # ---- contract ----------------------------------------------------------------------------------
    def forward(self, z: Tensor, n_scales: Optional[Tensor] = None) -> QuantOut:
        """Quantize ``z: [B, D, H, W]`` (``n_scales`` is ignored: one scale). See :class:`QuantOut`."""
        self.check_input(z)
        B = z.shape[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self.flatten(z)
            idx = self._search(x)
            zq = self.code_vectors()[idx]
            commit = self.beta * (zq.detach() - x).square().mean()
            vq = (zq - x.detach()).square().mean()
            out = self.unflatten(straight_through(zq, x))
            usage, perplexity = self.usage_stats(idx, 0, B)
        loss = {"vq": vq, "commit": commit, "entropy": vq.new_zeros(())}
        stats = {"usage": usage.view(1).detach(), "perplexity": perplexity.view(1).detach()}
        return QuantOut(quantized=out, indices=[idx.view(B, -1)], loss=loss, stats=stats)

    @torch.no_grad()
    def quantize_indices(self, z: Tensor) -> List[Tensor]:
        """Inference indices: a one-element list with ``[B, H*W]`` (row-major)."""
        self.check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return [self._search(self.flatten(z)).view(z.shape[0], -1)]

    def codes(self, idx: Tensor, si: int = 0) -> Tensor:
        """Code vectors ``[B, D, H, W]`` of ``idx: [B, H*W]`` (normalised rows when ``l2_norm``)."""
        cb = self.code_vectors() if self.training else self._search_codebook()[0]
        return self.unflatten(cb[idx])

    @torch.no_grad()
    def indices_to_fhat(self, indices: Sequence[Tensor], cumulative: bool = False) -> Union[Tensor, List[Tensor]]:
        """f_hat ``[B, D, H, W]`` of ``[idx [B, H*W]]`` (or ``[f_hat]`` when ``cumulative``)."""
        check_index_list(indices, self.scales, self.codebook_size)
        f_hat = self.codes(indices[0].long(), 0)
        return [f_hat] if cumulative else f_hat
