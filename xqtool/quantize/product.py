"""Product quantization: P independent branch quantizers sharing one scale schedule (spec §2.7, §3.4).

Branch order is checkpoint order (``quantizes.{i}.…``); the LAST branch is the semantic one. Branch maps
are concatenated on channels (branch 0 first): f_hat ``[B, P*D, H, W]``. Tokens are ``[B, P, L]`` with
L = Σ pn², per branch the per-scale row-major index maps concatenated coarse → fine.

Naming: methods on *tokens* ``[B, P, L]`` (``quantize``, ``tokens_to_fhat``, ``tokens_to_codes``, ``var_input``,
``var_next``) never share a name with the branch methods on per-scale *indices* (``quantize_indices``,
``indices_to_fhat``, ``codes``, ``indices_to_var_input``, ``var_step``). A ProductQuantizer is a
:class:`~xqtool.quantize.base.VARQuantizer`.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from xqtool.errors import ConfigError, TokenError
from xqtool.quantize.base import BranchQuantizer, MultiScaleUnit, ProductQuantOut, as_multiscale


class ProductQuantizer(nn.Module):
    """P branch quantizers (``self.quantizes``) with quantizer dropout.

    Args:
        branches: branch quantizers (same ``scales``, ``side``, ``dim``, ``codebook_size``).
        codebook_drop: fraction of each training batch (the first ⌊B·codebook_drop⌋ samples, ``n_drop``) that
            keeps only its first d_b ~ UniformInt[start_drop, S] scales (one draw per sample, shared by branches;
            spec §3.4). As in the reference, the scales are dropped only with several scales AND several branches
            (with P = 1 the reference does not pass codebook_drop to its multi-scale quantizer, §3 table note),
            but the semantic/detail losses skip the first ``n_drop`` samples whenever codebook_drop > 0, single-scale
            configs included (§5.2, e.g. VP2-4096 with 0.1).
        start_drop: smallest number of kept scales for a dropout sample.

    Raises ConfigError when ``branches`` is empty or the branches differ in scales, side, dim or codebook size.
    Bounds (codebook_drop in [0, 1), start_drop in 1..S) are checked once, by
    :func:`xqtool.config.validate_tokenizer_config`; the constructor does not re-check them.
    """

    def __init__(self, branches: Sequence[BranchQuantizer], codebook_drop: float = 0.0, start_drop: int = 1) -> None:
        super().__init__()
        if len(branches) == 0:
            raise ConfigError("quant.product_quant must be >= 1")
        first = branches[0]
        for i, b in enumerate(branches):
            for attr in ("scales", "side", "dim", "codebook_size"):
                if getattr(b, attr) != getattr(first, attr):
                    raise ConfigError(f"product branch {i} has {attr}={getattr(b, attr)}, branch 0 has "
                                      f"{getattr(first, attr)}; all branches must match")
        self.quantizes = nn.ModuleList(branches)
        self.scales: Tuple[int, ...] = tuple(first.scales)
        self.side: int = first.side
        self.dim: int = first.dim
        self.codebook_size: int = first.codebook_size
        self.num_branches = len(branches)
        self.num_tokens: int = first.num_tokens
        self.codebook_drop = float(codebook_drop)
        self.start_drop = int(start_drop)
        offs, o = [], 0
        for pn in self.scales:
            offs.append((o, o + pn * pn))
            o += pn * pn
        self._offsets = offs

    # ---- layout ----------------------------------------------------------------------------------
    @property
    def scale_offsets(self) -> List[Tuple[int, int]]:
        """(begin, end) token offsets of each scale inside a branch's L tokens."""
        return list(self._offsets)

    def _scale_of(self, pos: int) -> Tuple[int, int]:
        """(scale index, position inside the scale) of token position ``pos``."""
        for si, (b, e) in enumerate(self._offsets):
            if b <= pos < e:
                return si, pos - b
        raise IndexError(pos)

    def check_tokens(self, tokens: Union[Tensor, np.ndarray]) -> Tensor:
        """Validate ``[B, P, L]`` integer tokens (TokenError naming row, branch, scale, value); return long tensor."""
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(tokens)
        if not isinstance(tokens, Tensor):
            raise TokenError(f"tokens must be a tensor or numpy array, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TokenError(f"tokens must be integers, got dtype {tokens.dtype}")
        P, L = self.num_branches, self.num_tokens
        if tokens.dim() != 3 or tokens.shape[1] != P or tokens.shape[2] != L:
            raise TokenError(f"tokens have shape {tuple(tokens.shape)}, expected [N, {P}, {L}] "
                             f"(P={P} branches, L={L} tokens for scales {list(self.scales)})")
        self._check_range(tokens, self._scale_of)
        return tokens.long()

    def _check_range(self, ids: Tensor, locate: Callable[[int], Tuple[int, int]]) -> None:
        """TokenError naming row, branch, scale and position of the first id of ``ids [B, P, n]`` outside
        0..K−1; ``locate`` maps a position on the last axis to (scale, position inside the scale)."""
        bad = (ids < 0) | (ids >= self.codebook_size)
        if bool(bad.any()):
            row, branch, pos = (int(v) for v in bad.nonzero()[0])
            si, k = locate(pos)
            raise TokenError(f"token out of range at row {row}, branch {branch}, scale {si} (position {k}): "
                             f"value {int(ids[row, branch, pos])}, valid range is 0..{self.codebook_size - 1}")

    def split_tokens(self, tokens: Union[Tensor, np.ndarray]) -> List[List[Tensor]]:
        """``[B, P, L]`` → list (P) of list (S) of ``[B, pn*pn]`` (validated)."""
        tokens = self.check_tokens(tokens)
        return [[tokens[:, p, b:e] for (b, e) in self._offsets] for p in range(self.num_branches)]

    def _check_z(self, z_list: Sequence[Tensor]) -> None:
        if len(z_list) != self.num_branches:
            raise ValueError(f"expected {self.num_branches} branch latents, got {len(z_list)}")

    # ---- training forward ------------------------------------------------------------------------
    def forward(self, z_list: Sequence[Tensor]) -> ProductQuantOut:
        """Quantize P latents ``[B, D, H, W]``; see :class:`ProductQuantOut`."""
        self._check_z(z_list)
        B, S = z_list[0].shape[0], len(self.scales)
        n_scales: Optional[Tensor] = None
        n_drop = int(math.floor(B * self.codebook_drop)) if self.training else 0
        if n_drop and S > 1 and self.num_branches > 1:
            d = torch.randint(self.start_drop, S + 1, (B,))
            n_scales = torch.full((B,), S, dtype=torch.long)
            n_scales[:n_drop] = d[:n_drop]
            n_scales = n_scales.to(z_list[0].device)
        outs = [q(z, n_scales) for q, z in zip(self.quantizes, z_list)]
        loss = {k: torch.stack([o.loss[k] for o in outs]).mean() for k in ("vq", "commit", "entropy")}
        stats = {k: torch.stack([o.stats[k] for o in outs]) for k in ("usage", "perplexity")}
        indices = torch.stack([torch.cat(o.indices, dim=1) for o in outs], dim=1)
        branch_outputs = [o.quantized for o in outs]
        return ProductQuantOut(
            quantized=torch.cat(branch_outputs, dim=1), branch_outputs=branch_outputs, indices=indices,
            loss=loss, stats=stats, n_drop=n_drop,
        )

    # ---- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, z_list: Sequence[Tensor]) -> Tensor:
        """Inference tokens ``[B, P, L]`` of P latents ``[B, D, H, W]``."""
        self._check_z(z_list)
        return torch.stack([torch.cat(q.quantize_indices(z), dim=1) for q, z in zip(self.quantizes, z_list)], dim=1)

    @torch.no_grad()
    def tokens_to_fhat(self, tokens: Union[Tensor, np.ndarray], cumulative: bool = False
                       ) -> Union[Tensor, List[Tensor]]:
        """f_hat ``[B, P*D, H, W]`` of tokens ``[B, P, L]`` (or list over scales of cumulative maps)."""
        per = [q.indices_to_fhat(ids, cumulative=cumulative)
               for q, ids in zip(self.quantizes, self.split_tokens(tokens))]
        if cumulative:
            return [torch.cat([p[si] for p in per], dim=1) for si in range(len(per[0]))]
        return torch.cat(per, dim=1)

    def tokens_to_codes(self, ids: Tensor, si: int) -> Tensor:
        """Code vectors ``[B, P*D, pn, pn]`` of one scale's tokens ``ids: [B, P, pn*pn]`` (branch 0 channels
        first). Raises TokenError on a wrong shape, a float dtype or an id outside 0..K−1."""
        pn = self.scales[si]
        if not isinstance(ids, Tensor) or ids.dim() != 3 or ids.shape[1] != self.num_branches \
                or ids.shape[2] != pn * pn or ids.dtype.is_floating_point:
            raise TokenError(f"scale {si}: ids must be an integer tensor [B, {self.num_branches}, {pn * pn}], "
                             f"got {getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        self._check_range(ids, lambda k: (si, k))
        return torch.cat([q.codes(ids[:, p].long(), si) for p, q in enumerate(self.quantizes)], dim=1)

    # ---- VAR interface ---------------------------------------------------------------------------
    def _var_units(self) -> List[MultiScaleUnit]:
        """The branches as multi-scale units; ConfigError for a single-scale tokenizer."""
        return [as_multiscale(q) for q in self.quantizes]

    @torch.no_grad()
    def var_input(self, tokens: Union[Tensor, np.ndarray]) -> Tensor:
        """Teacher-forcing inputs ``[B, L − scales[0]², P*D]`` (branch 0 channels first). Raises ConfigError
        for single-scale branches, TokenError for invalid tokens."""
        units = self._var_units()
        return torch.cat([q.indices_to_var_input(ids) for q, ids in zip(units, self.split_tokens(tokens))], dim=-1)

    @torch.no_grad()
    def var_next(self, si: int, f_hat: Tensor, ids: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Sampling step: add scale ``si``'s codes of ``ids [B, P, pn*pn]`` to ``f_hat [B, P*D, H, W]``.

        Returns ``(f_hat, next)`` with ``next`` ``[B, pn_next², P*D]`` (None at the last scale).
        """
        units = self._var_units()
        codes = self.tokens_to_codes(ids, si)
        D = self.dim
        new_f, nxt = [], []
        for p, q in enumerate(units):
            f_p, n_p = q.var_step(si, f_hat[:, p * D:(p + 1) * D], codes[:, p * D:(p + 1) * D])
            new_f.append(f_p)
            nxt.append(n_p)
        f_hat = torch.cat(new_f, dim=1)
        if nxt[0] is None:
            return f_hat, None
        return f_hat, torch.cat(nxt, dim=1).flatten(2).transpose(1, 2)
