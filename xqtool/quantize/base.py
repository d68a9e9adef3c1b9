"""The quantizer contract as types, plus small shared helpers.

A *branch quantizer* (:class:`BranchQuantizer`: single-scale VQ, multi-scale residual VQ, multi-scale
LFQ/BSQ) maps a latent map ``z: [B, D, H, W]`` to a quantized map of the same shape plus per-scale
integer *indices*. Scales are listed coarse to fine (``scales = (1, 1, 2, 3, ..., H)``); a
single-scale quantizer has ``scales == (H,)``. Indices of one scale are ``[B, pn*pn]`` in row-major
order. Multi-scale branches also satisfy :class:`MultiScaleUnit` (the residual steps VAR needs);
the product quantizer over P branches, which speaks in *tokens* ``[B, P, L]``, satisfies
:class:`VARQuantizer` (what VAR training and sampling read).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from xqtool.errors import ConfigError, TokenError
from xqtool.metrics import usage_perplexity


@dataclass
class QuantOut:
    """Result of a quantizer's training forward.

    Attributes:
        quantized: ``[B, D, H, W]`` straight-through output (value of the quantized map, gradient of
            identity to the input).
        indices: one ``[B, pn*pn]`` long tensor per scale, coarse to fine.
        loss: scalar loss terms: ``vq`` (codebook), ``commit`` (commitment, already times beta),
            ``entropy`` (LFQ/BSQ, already times its weight; 0 otherwise).
        stats: detached diagnostics: ``usage`` ``[S]`` per scale: in training the fraction of codes whose EMA
            hit count reaches the spec's margin (:func:`ema_usage`), in eval the fraction hit in this batch;
            ``perplexity`` ``[S]`` exp(entropy of the code histogram) per scale.
    """

    quantized: Tensor
    indices: List[Tensor]
    loss: Dict[str, Tensor]
    stats: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ProductQuantOut:
    """Result of :class:`xqtool.quantize.ProductQuantizer`'s training forward (P branches).

    Attributes:
        quantized: ``[B, P*D, H, W]`` branch outputs concatenated on channels, branch 0 first.
        branch_outputs: P tensors ``[B, D, H, W]`` (straight-through; the last one is the semantic branch).
        indices: ``[B, P, L]`` long, per branch the per-scale index maps concatenated coarse to fine.
        loss: ``vq`` / ``commit`` / ``entropy`` scalars averaged over branches.
        stats: ``usage`` ``[P, S]`` and ``perplexity`` ``[P, S]`` (detached).
        n_drop: the first ``n_drop`` = ⌊B·codebook_drop⌋ samples (training) are the quantizer-dropout samples;
            the semantic/detail losses skip them (even where no scale is dropped: S = 1 or P = 1).
    """

    quantized: Tensor
    branch_outputs: List[Tensor]
    indices: Tensor
    loss: Dict[str, Tensor]
    stats: Dict[str, Tensor] = field(default_factory=dict)
    n_drop: int = 0


# ----------------------------------------------------------------------------------------------
# helpers shared by the branch quantizers
# ----------------------------------------------------------------------------------------------


def check_scales(scales: Sequence[int], side: int) -> Tuple[int, ...]:
    """Validate a coarse-to-fine scale list whose last entry is the latent side; return it as a tuple."""
    scales = tuple(int(s) for s in scales)
    if not scales:
        raise ConfigError("quant.v_patch_nums is empty; give at least one scale, e.g. [16] or [1,1,2,3,3,4,5,6,8,11]")
    if any(s <= 0 for s in scales):
        raise ConfigError(f"quant.v_patch_nums must be positive integers, got {list(scales)}")
    if scales[-1] != int(side) or any(s > side for s in scales):
        raise ConfigError(
            f"quant.v_patch_nums {list(scales)} must end at the latent side {side} (sqrt(num_latent_tokens)) "
            f"and never exceed it"
        )
    return scales


def distributed_ready() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def code_histogram(idx: Tensor, codebook_size: int, reduce: bool = False) -> Tensor:
    """Float histogram ``[K]`` of an index tensor; all-reduced over ranks when ``reduce`` and distributed."""
    hist = torch.bincount(idx.reshape(-1), minlength=codebook_size).float()
    if reduce and distributed_ready():
        dist.all_reduce(hist)
    return hist


def ema_hit_update(buf: Tensor, hist: Tensor, record_hit: int) -> None:
    """Usage EMA of the reference: copy on the first call, factor 0.9 for 100 calls, 0.99 afterwards."""
    if record_hit == 0:
        buf.copy_(hist)
    elif record_hit < 100:
        buf.mul_(0.9).add_(hist, alpha=0.1)
    else:
        buf.mul_(0.99).add_(hist, alpha=0.01)


def ema_usage(ema_hits: Tensor, vectors_per_rank: int) -> Tensor:
    """Training codebook usage (spec tokenizer.md §3.1, §3.5): the fraction of the K codes whose EMA hit count
    ``ema_hits [K]`` is ≥ margin = 0.08 · world_size · vectors_per_rank / K (vectors_per_rank = B·H·W, the
    full-resolution positions of the local batch, for every scale). Scalar tensor in [0, 1]."""
    world = dist.get_world_size() if distributed_ready() else 1
    margin = 0.08 * world * float(vectors_per_rank) / ema_hits.numel()
    return (ema_hits >= margin).float().mean()


def straight_through(value: Tensor, source: Tensor) -> Tensor:
    """Exactly ``value`` in the forward pass, identity gradient to ``source`` in the backward pass.

    ``source - source.detach()`` is an exact zero, so unlike ``sg[v] - sg[s] + s`` the result carries
    no float rounding: eval-mode outputs equal the decoded tokens bit for bit.
    """
    return value.detach() + (source - source.detach())


class CodebookCache:
    """Eval-mode cache of a value derived from a codebook weight (e.g. the normalised codebook).

    The cached value is reused while the weight has the same storage, device, dtype, autograd version
    counter and a strided probe of its values (the probe also catches ``weight.data.copy_(...)``
    edits, which do not bump the version counter). Training mode always recomputes.
    """

    _PROBE_STRIDE = 61

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._probe: Optional[Tensor] = None
        self._value: Any = None

    def clear(self) -> None:
        """Drop the cached value."""
        self._key, self._probe, self._value = None, None, None

    def get(self, weight: Tensor, compute: Callable[[], Any], training: bool) -> Any:
        """Return ``compute()`` (run without grad, outside inference mode), cached when not ``training``."""
        if training:
            with torch.inference_mode(False), torch.no_grad():
                return compute()
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape))
        probe = weight.detach().reshape(-1)[:: self._PROBE_STRIDE]
        if self._key == key and self._probe is not None and torch.equal(self._probe, probe):
            return self._value
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
            self._probe = probe.clone()
        self._key, self._value = key, value
        return value


def check_index_list(indices: Sequence[Tensor], scales: Sequence[int], codebook_size: int) -> int:
    """Validate per-scale index maps ``[B, pn*pn]``; return B. Raises TokenError with one line."""
    if not isinstance(indices, (list, tuple)) or len(indices) != len(scales):
        n = len(indices) if isinstance(indices, (list, tuple)) else type(indices).__name__
        raise TokenError(f"expected a list of {len(scales)} per-scale index maps (scales {list(scales)}), got {n}")
    batch = None
    for si, (idx, pn) in enumerate(zip(indices, scales)):
        if not isinstance(idx, Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TokenError(f"scale {si}: indices must be an integer tensor, got {getattr(idx, 'dtype', type(idx))}")
        if idx.dim() != 2 or idx.shape[1] != pn * pn or (batch is not None and idx.shape[0] != batch):
            raise TokenError(
                f"scale {si}: index map has shape {tuple(idx.shape)}, expected [B, {pn * pn}] (side {pn})"
            )
        batch = idx.shape[0]
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= codebook_size:
                bad = lo if lo < 0 else hi
                raise TokenError(f"scale {si}: index {bad} out of range, valid range is 0..{codebook_size - 1}")
    return int(batch or 0)


# ----------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------


class BranchQuantizer(nn.Module, ABC):
    """Abstract branch quantizer: the state and methods every branch shares (one return contract).

    Args:
        codebook_size: K codes.  dim: D channels.  side: H = W of the latent map.
        scales: coarse-to-fine sides ending at ``side`` (validated by :func:`check_scales`, ConfigError).
        l2_norm: cosine/spherical variant (VQ: normalised search; LFQ: BSQ).  beta: commitment weight.

    Attributes:
        num_tokens: L = Σ pn² indices per sample.
        ema_vocab_hit_SV: persistent EMA of code hits, ``[K]`` for one scale, ``[S, K]`` for several
            (checkpoint layout); ``record_hit`` counts training forwards (:func:`ema_hit_update`).

    Subclasses implement :meth:`forward` (→ :class:`QuantOut`), :meth:`quantize_indices`,
    :meth:`codes` and :meth:`indices_to_fhat`.
    """

    def __init__(
        self, codebook_size: int, dim: int, scales: Sequence[int], side: int, *, l2_norm: bool = True,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        self.scales: Tuple[int, ...] = check_scales(scales, side)
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.side = int(side)
        self.num_tokens = sum(pn * pn for pn in self.scales)
        self.l2_norm = bool(l2_norm)
        self.beta = float(beta)
        hits = (self.codebook_size,) if len(self.scales) == 1 else (len(self.scales), self.codebook_size)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(hits))
        self.record_hit = 0

    @abstractmethod
    def forward(self, z: Tensor, n_scales: Optional[Tensor] = None) -> QuantOut:
        """Training forward of ``z: [B, D, H, W]``; ``n_scales: [B]`` = scales kept per sample (quantizer
        dropout; ignored with one scale). Returns :class:`QuantOut`."""

    @abstractmethod
    def quantize_indices(self, z: Tensor) -> List[Tensor]:
        """Inference indices of ``z: [B, D, H, W]``: one ``[B, pn*pn]`` long tensor per scale."""

    @abstractmethod
    def codes(self, idx: Tensor, si: int) -> Tensor:
        """Code vectors ``[B, D, pn, pn]`` of the indices ``idx: [B, pn*pn]`` at scale ``si``."""

    @abstractmethod
    def indices_to_fhat(self, indices: Sequence[Tensor], cumulative: bool = False) -> Union[Tensor, List[Tensor]]:
        """f_hat ``[B, D, H, W]`` of per-scale indices (a list of S maps after each scale when ``cumulative``).
        Raises :class:`xqtool.errors.TokenError` on a wrong count, shape or index range."""

    def check_input(self, z: Tensor) -> None:
        """Raise ValueError unless ``z`` is ``[B, D, side, side]``."""
        if z.dim() != 4 or z.shape[1] != self.dim or z.shape[2] != self.side or z.shape[3] != self.side:
            raise ValueError(f"expected z of shape [B, {self.dim}, {self.side}, {self.side}], got {tuple(z.shape)}")

    def usage_stats(self, idx: Tensor, si: int, batch: int) -> Tuple[Tensor, Tensor]:
        """(usage, perplexity) scalars of scale ``si``'s indices; in training also updates the hit EMA and
        reports the EMA usage of :func:`ema_usage` (``batch`` = B of the local batch)."""
        hist = code_histogram(idx, self.codebook_size, reduce=self.training)
        usage, perplexity = usage_perplexity(hist)
        if self.training:
            hits = self.ema_vocab_hit_SV if self.ema_vocab_hit_SV.dim() == 1 else self.ema_vocab_hit_SV[si]
            with torch.no_grad():
                ema_hit_update(hits, hist, self.record_hit)
                usage = ema_usage(hits, batch * self.side * self.side)
            self.record_hit += 1
        return usage, perplexity


class Codebook(nn.Embedding):
    """Learned codebook ``weight [K, D]`` (uniform ±1/K init, rows normalised when ``l2_norm``) with an
    eval-mode :class:`CodebookCache` for search tables derived from it. Registered as ``embedding``
    (state-dict key ``embedding.weight``)."""

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool) -> None:
        super().__init__(codebook_size, dim)
        with torch.no_grad():
            self.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.weight.copy_(torch.nn.functional.normalize(self.weight, dim=1))
        self._cache = CodebookCache()

    def cached(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` without grad; cached in eval mode while the weight is unchanged."""
        return self._cache.get(self.weight, compute, self.training)

    def train(self, mode: bool = True) -> "Codebook":  # noqa: D102
        self._cache.clear()
        return super().train(mode)


@runtime_checkable
class MultiScaleUnit(Protocol):
    """What the product quantizer's VAR interface needs from each (multi-scale) branch (spec var.md §3)."""

    scales: Tuple[int, ...]
    dim: int
    side: int
    codebook_size: int
    num_tokens: int

    def codes(self, idx: Tensor, si: int) -> Tensor: ...

    def indices_to_var_input(self, indices: Sequence[Tensor]) -> Tensor: ...

    def var_step(self, si: int, f_hat: Tensor, codes: Tensor) -> Tuple[Tensor, Optional[Tensor]]: ...


def as_multiscale(unit: nn.Module) -> MultiScaleUnit:
    """``unit`` typed as a :class:`MultiScaleUnit`; ConfigError when it is not one (single-scale VQ)."""
    if not isinstance(unit, MultiScaleUnit):
        raise ConfigError("VAR needs a multi-scale tokenizer (quant.v_patch_nums with more than one scale)")
    return unit


@runtime_checkable
class VARQuantizer(Protocol):
    """What VAR training and sampling read from the tokenizer's quantizer (a product of P branches).

    Tokens are ``[B, P, L]``; f_hat is ``[B, P·D, side, side]`` (branch 0 channels first).
    """

    scales: Tuple[int, ...]
    num_branches: int
    dim: int
    side: int
    codebook_size: int
    num_tokens: int

    def var_input(self, tokens: Tensor) -> Tensor: ...

    def var_next(self, si: int, f_hat: Tensor, ids: Tensor) -> Tuple[Tensor, Optional[Tensor]]: ...
