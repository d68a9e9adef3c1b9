"""Next-scale sampling for :class:`~xqtool.models.var.VAR` with classifier-free guidance (spec var.md §4).

Per scale si (coarse → fine): run the transformer on this scale's tokens (attending to the cached keys of all
earlier scales, or recomputing the whole prefix when ``use_cache=False``), mix conditional and unconditional
logits with the linear-in-scale weight t = cfg·si/(SN−1), filter each branch's K logits (top-k keeping ties,
then top-p with upstream's "≤ 1 − p on the ascending cumsum" rule), draw one token per position and branch,
and feed the codes back through the tokenizer's quantizer (``quantizer.var_next``) to build the next input.

Random numbers (three modes):
- ``seeds=[s_0, …, s_{B−1}]`` (xqtool default): image b has its own ``torch.Generator`` seeded with s_b and
  draws only its own tokens (per scale: branch 0, then branch 1, …). An image's tokens therefore do not depend
  on the batch it is in, on the batch size or on the number of processes. This deliberately differs from
  upstream, whose one generator is consumed by the whole batch.
- ``generator=g``: upstream order (one ``(B·pn²) × K`` multinomial per scale and branch on one generator),
  for token parity with the reference.
- neither: the global RNG of the device, consumed in upstream order (upstream ``g_seed=None``).

Logits are never modified in place, and the KV cache is a local object (spec §7.7).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from xqtool.models.var import VAR, KVCache

__all__ = ["SampleOutput", "cfg_weight", "guide_logits", "top_k_filter", "top_p_filter", "filter_logits",
           "sample_tokens", "image_generators", "QuantizerLike"]


class QuantizerLike(Protocol):
    """What sampling needs from the tokenizer's product quantizer."""

    def var_next(self, si: int, f_hat: Tensor, ids: Tensor) -> Tuple[Tensor, Optional[Tensor]]: ...


@dataclass
class SampleOutput:
    """tokens: LongTensor [B, P, L]; f_hat: cumulative latent [B, P·D, H, W] ready for ``tok.decode_fhat``."""

    tokens: Tensor
    f_hat: Tensor


def cfg_weight(cfg: float, si: int, num_scales: int) -> float:
    """Guidance weight of scale si: cfg·si/(SN−1) (0 at the first scale, cfg at the last)."""
    return cfg * si / (num_scales - 1) if num_scales > 1 else float(cfg)


def guide_logits(logits_2B: Tensor, t: float) -> Tensor:
    """[2B, …] (conditional rows first) → (1 + t)·cond − t·uncond, [B, …]. t = 0 gives the conditional rows."""
    b = logits_2B.shape[0] // 2
    return logits_2B[:b] * (1 + t) - logits_2B[b:] * t


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set logits strictly below the k-th largest to −inf (ties at the k-th value survive). k ≤ 0 disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    tau = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < tau, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter, upstream rule: sort ascending, remove positions whose running softmax sum is ≤ 1 − p,
    always keep the largest. p ≤ 0 disables (it would otherwise mean greedy)."""
    if p <= 0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p over the last dim (fp32, out of place)."""
    logits = logits.float()
    if temperature != 1.0:
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def image_generators(seeds: Sequence[int], device: Union[str, torch.device]) -> List[torch.Generator]:
    """One generator per image, seeded with its own seed (e.g. base_seed + global image index)."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def _labels_tensor(labels: Union[Tensor, int, Sequence[int], None], batch: int, num_classes: int,
                   device: torch.device, gens: Optional[List[torch.Generator]],
                   generator: Optional[torch.Generator]) -> Tensor:
    if labels is None:
        uniform = torch.ones(1, num_classes, device=device)
        if gens is not None:
            return torch.cat([torch.multinomial(uniform, 1, generator=g).view(1) for g in gens])
        return torch.multinomial(uniform, batch, replacement=True, generator=generator).view(batch)
    if isinstance(labels, int):
        value = num_classes if labels < 0 else labels
        return torch.full((batch,), value, dtype=torch.long, device=device)
    lab = torch.as_tensor(labels, dtype=torch.long, device=device).view(-1)
    if lab.numel() != batch:
        raise ValueError(f"got {lab.numel()} labels for a batch of {batch}")
    return lab


def _draw(probs: Tensor, gens: Optional[List[torch.Generator]], generator: Optional[torch.Generator]) -> Tensor:
    """probs [B, n, P, K] → ids [B, P, n]. Per-image generators, or one generator in upstream order."""
    b, n, p, k = probs.shape
    if gens is not None:
        out = torch.empty(b, p, n, dtype=torch.long, device=probs.device)
        for i, g in enumerate(gens):
            for j in range(p):
                out[i, j] = torch.multinomial(probs[i, :, j], 1, generator=g).view(n)
        return out
    cols = [torch.multinomial(probs[:, :, j].reshape(b * n, k), 1, generator=generator).view(b, n)
            for j in range(p)]
    return torch.stack(cols, dim=1)


def _initial_fhat(quantizer: object, batch: int, device: torch.device) -> Tensor:
    branches = quantizer.quantizes  # type: ignore[attr-defined]
    dim = sum(int(q.dim) for q in branches)  # P·D, branch 0 channels first
    side = int(branches[0].side)
    return torch.zeros(batch, dim, side, side, device=device)



@contextlib.contextmanager
def _low_precision_linears(modules: Sequence[nn.Module], dtype: torch.dtype):
    """Temporarily swap every ``nn.Linear`` weight/bias under `modules` for a `dtype` copy.

    Autocast casts Linear inputs to `dtype` on every call and caches the cast only for parameters that require
    grad, so a frozen model would re-cast all block weights at every scale. Casting once per sampling call gives
    bit-identical results (the same ``.to(dtype)`` rounding) for the Linear layers that run under autocast.
    The original parameters are always restored.
    """
    saved = []
    try:
        for root in modules:
            for mod in root.modules():
                if not isinstance(mod, nn.Linear):
                    continue
                for name in ("weight", "bias"):
                    prm = mod._parameters.get(name)
                    if prm is not None and prm.is_floating_point() and prm.dtype != dtype:
                        saved.append((mod, name, prm))
                        mod._parameters[name] = nn.Parameter(prm.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for mod, name, prm in reversed(saved):
            mod._parameters[name] = prm


@torch.no_grad()
def sample_tokens(
    var: VAR,
    quantizer: QuantizerLike,
    labels: Union[Tensor, int, Sequence[int], None],
    *,
    batch_size: Optional[int] = None,
    cfg: float = 3.25,
    top_k: int = 750,
    top_p: float = 0.95,
    temperature: float = 1.0,
    seeds: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
    logits_hook: Optional[Callable[[int, Tensor], None]] = None,
) -> SampleOutput:
    """Sample multi-scale tokens for a batch.

    Args:
        var: the transformer (put in eval mode by the caller; labels are never dropped here).
        quantizer: the tokenizer's product quantizer (``var_next`` and ``quantizes[b].dim/.side``).
        labels: LongTensor/list [B], an int for the whole batch (negative = unconditional), or None (random).
        batch_size: B when labels is an int or None (else inferred from labels / seeds).
        cfg: guidance strength at the last scale (linear schedule from 0 at scale 0).
        top_k, top_p, temperature: filtering (0 disables top-k / top-p).
        seeds: per-image seeds → batch-size-independent results (xqtool default).
        generator: a single generator in upstream order (used only when seeds is None).
        use_cache: KV cache across scales (False recomputes the whole prefix at each scale; same tokens).
        amp_dtype: run the transformer under autocast with this dtype (logit mixing and draws stay fp32).
        logits_hook: called with (si, guided fp32 logits [B, pn², V]) before filtering (tests, analysis).
    Returns:
        :class:`SampleOutput` with tokens [B, P, L] and the final f_hat [B, P·D, H, W].
    """
    device = var.pos_1LC.device
    if batch_size is None:
        if isinstance(labels, (int, type(None))):
            if seeds is None:
                raise ValueError("batch_size is required when labels is an int or None and no seeds are given")
            batch_size = len(seeds)
        else:
            batch_size = len(labels)
    B = int(batch_size)
    gens = image_generators(seeds, device) if seeds is not None else None
    if gens is not None and len(gens) != B:
        raise ValueError(f"got {len(gens)} seeds for a batch of {B}")
    if gens is None and generator is None:
        generator = None  # global RNG, upstream g_seed=None
    lab = _labels_tensor(labels, B, var.num_classes, device, gens, generator)

    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    # The Linear layers that run under autocast (blocks, head_nm, head; not word_embed) get their weights cast
    # once per call instead of once per scale: same numbers, no per-scale weight copies.
    with (_low_precision_linears([var.blocks, var.head_nm, var.head], amp_dtype) if amp_dtype is not None
          else contextlib.nullcontext()):
        return _sample(var, quantizer, lab, gens, generator, cfg=cfg, top_k=top_k, top_p=top_p,
                       temperature=temperature, use_cache=use_cache, amp=amp, logits_hook=logits_hook)


def _sample(var: VAR, quantizer: QuantizerLike, lab: Tensor, gens: Optional[List[torch.Generator]],
            generator: Optional[torch.Generator], *, cfg: float, top_k: int, top_p: float, temperature: float,
            use_cache: bool, amp: object, logits_hook: Optional[Callable[[int, Tensor], None]]) -> SampleOutput:
    """The scale loop of :func:`sample_tokens` (labels resolved, generators made)."""
    device = var.pos_1LC.device
    B = int(lab.shape[0])
    null = torch.full_like(lab, var.num_classes)
    P, K = var.num_branches, var.codebook_size
    cond = var.class_cond(torch.cat([lab, null]))  # [2B, C] fp32
    with amp:
        mods = var.block_modulations(cond)
        head_mod = var.head_nm.modulation(cond)
    x = var.start_tokens(cond)  # [2B, first_l, C]
    lvl_pos = var.lvl_pos()  # [1, L, C], token-independent: once per call
    f_hat = _initial_fhat(quantizer, B, device)
    cache = KVCache(var.depth, capacity=var.L) if use_cache else None
    prefix: List[Tensor] = []
    mask = var.attn_mask(device) if not use_cache else None
    ids_all: List[Tensor] = []
    for si, pn in enumerate(var.patch_nums):
        n = pn * pn
        with amp:
            if use_cache:
                h = var.run_blocks(x, mods, None, cache)
            else:
                prefix.append(x)
                full = torch.cat(prefix, dim=1)
                t_len = full.shape[1]
                h = var.run_blocks(full, mods, mask[:t_len, :t_len])[:, -n:]
            logits = var.logits(h, head_mod)  # [2B, n, V] fp32
        guided = guide_logits(logits, cfg_weight(cfg, si, var.num_scales))
        if logits_hook is not None:
            logits_hook(si, guided)
        filtered = filter_logits(guided.view(B, n, P, K), top_k, top_p, temperature)
        ids = _draw(filtered.softmax(dim=-1), gens, generator)  # [B, P, n]
        ids_all.append(ids)
        f_hat, nxt = quantizer.var_next(si, f_hat, ids)
        if si + 1 < var.num_scales:
            if nxt is None:
                raise RuntimeError("quantizer.var_next returned no next input before the last scale")
            x = var.embed_scale(nxt, si + 1, lvl_pos)
            x = torch.cat([x, x], dim=0)
    return SampleOutput(tokens=torch.cat(ids_all, dim=-1), f_hat=f_hat)
