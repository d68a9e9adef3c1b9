"""Next-scale sampling for :class:`~xqtool.models.var.VAR` with classifier-free guidance (spec var.md §4).

Per scale si (coarse → fine): run the transformer on this scale's tokens (attending to the cached keys of all
earlier scales, or recomputing the whole prefix when ``use_cache=False``), mix conditional and unconditional
logits with the linear-in-scale weight t = cfg·si/(SN−1), filter each branch's K logits (top-k keeping ties,
then top-p with upstream's "≤ 1 − p on the ascending cumsum" rule), draw one token per position and branch,
and feed the codes back through the tokenizer's quantizer (``quantizer.var_next``) to build the next input.

Random numbers (three modes):
- ``seeds=[s_0, …, s_{B−1}]`` (xqtool default): image b has its own ``torch.Generator`` seeded with s_b and
  draws only its own tokens (per scale: one multinomial over its pn² rows of branch 0, then branch 1, …, each
  row restricted to the candidates that survive top-k/top-p, see :func:`filtered_candidates`; the distribution
  is exactly the filtered softmax, only cheaper to draw from). An image's tokens therefore do not depend
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
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from xqtool.models.var import VAR, KVCache
from xqtool.quantize.base import VARQuantizer

__all__ = ["SampleOutput", "cfg_weight", "guide_logits", "top_k_filter", "top_p_filter", "filter_logits",
           "filtered_candidates", "sample_tokens", "image_generators"]


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


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """fp32 logits divided by the temperature (out of place)."""
    logits = logits.float()
    if temperature != 1.0:
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        logits = logits / temperature
    return logits


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p over the last dim (fp32, out of place)."""
    logits = _tempered(logits, temperature)
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


def filtered_candidates(logits: Tensor, top_k: int = 0, top_p: float = 0.0,
                        temperature: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """The same distribution as ``filter_logits(...).softmax(-1)``, restricted to the candidates that can survive.

    logits [..., K] → (probs [..., k'], ids [..., k'] LongTensor, or None when the candidates are the whole
    vocabulary in order). With top-k the candidates are the k largest logits (descending), so top-p, the softmax
    and the draw touch k values instead of K (with K = 4096 and k = 750 this is most of the sampling cost).
    Scattering ``probs`` back to ``ids`` gives the full-vocabulary probabilities (candidates below the k-th value
    get probability 0). Logits tied with the k-th value all survive, as in :func:`top_k_filter`.
    """
    logits = _tempered(logits, temperature)
    num = logits.shape[-1]
    ids: Optional[Tensor] = None
    if 0 < top_k < num:
        # a few spare columns absorb ties at the k-th value (common with bf16 logits) without a second topk
        width = min(num, top_k + max(16, top_k // 8))
        vals, ids = logits.topk(width, dim=-1)  # descending
        tau = vals[..., top_k - 1:top_k]
        if width < num and bool((vals[..., -1:] >= tau).any()):  # a tie group may reach past the spare columns
            vals, ids = logits.topk(int((logits >= tau).sum(-1).max()), dim=-1)
        vals = vals.masked_fill(vals < tau, float("-inf"))  # ties with the k-th value survive, like top_k_filter
    elif top_p > 0:
        vals, ids = logits.sort(dim=-1, descending=True)
    else:
        vals = logits
    if top_p > 0:
        # upstream rule on the ascending order: drop what the running softmax sum keeps at or below 1 − p
        cum = vals.flip(-1).softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)
        drop[..., -1] = False  # the largest always survives
        vals = vals.masked_fill(drop.flip(-1), float("-inf"))
    return vals.softmax(dim=-1), ids


def _draw_candidates(probs: Tensor, ids: Optional[Tensor], gens: List[torch.Generator]) -> Tensor:
    """probs/ids [B, n, P, k] → token ids [B, P, n]; image i draws all its tokens from its own generator
    (one multinomial over its P·n rows, branch 0 first)."""
    b, n, p, k = probs.shape
    out = torch.empty(b, p, n, dtype=torch.long, device=probs.device)
    for i, g in enumerate(gens):
        rows = probs[i].transpose(0, 1).reshape(p * n, k)
        pick = torch.multinomial(rows, 1, generator=g)  # [P·n, 1] candidate positions
        if ids is not None:
            pick = ids[i].transpose(0, 1).reshape(p * n, k).gather(1, pick)
        out[i] = pick.view(p, n)
    return out


def _draw(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """probs [B, n, P, K] → ids [B, P, n]: one (B·n) × K multinomial per branch on one generator (upstream order)."""
    b, n, p, k = probs.shape
    cols = [torch.multinomial(probs[:, :, j].reshape(b * n, k), 1, generator=generator).view(b, n)
            for j in range(p)]
    return torch.stack(cols, dim=1)


def _initial_fhat(quantizer: VARQuantizer, batch: int, device: torch.device) -> Tensor:
    """Zero f_hat ``[batch, P·D, side, side]`` (branch 0 channels first)."""
    side = int(quantizer.side)
    return torch.zeros(batch, quantizer.num_branches * quantizer.dim, side, side, device=device)



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
    quantizer: VARQuantizer,
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
        quantizer: the tokenizer's product quantizer (a :class:`~xqtool.quantize.base.VARQuantizer`: ``var_next``, ``num_branches``, ``dim``, ``side``).
        labels: LongTensor/list [B], an int for the whole batch (negative = unconditional), or None (random).
        batch_size: B when labels is an int or None (else inferred from labels / seeds).
        cfg: guidance strength at the last scale (linear schedule from 0 at scale 0).
        top_k, top_p, temperature: filtering (0 disables top-k / top-p).
        seeds: per-image seeds → batch-size-independent results (xqtool default).
        generator: a single generator in upstream order (used only when seeds is None).
        use_cache: KV cache across scales (False recomputes the whole prefix at each scale; same tokens).
        amp_dtype: run the transformer under autocast with this dtype (logit mixing and draws stay fp32).
            On the CPU, wrap a sampling loop in ``with var.packed_linears(amp_dtype or torch.float32):`` for
            oneDNN pre-packed linears (faster; packing once costs a weight reorder).
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
    lab = _labels_tensor(labels, B, var.num_classes, device, gens, generator)

    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    compute = amp_dtype or torch.float32
    if var.packed_dtype is not None and var.packed_dtype != compute:
        raise ValueError(f"the model's linears are packed for {var.packed_dtype}, but sampling asks for {compute}")
    # The Linear layers that run under autocast (blocks, head_nm, head; not word_embed) get their weights cast
    # once per call instead of once per scale: same numbers, no per-scale weight copies. Not needed when the
    # caller packed them already (``var.packed_linears``).
    with (_low_precision_linears([var.blocks, var.head_nm, var.head], amp_dtype)
          if amp_dtype is not None and var.packed_dtype is None else contextlib.nullcontext()):
        return _sample(var, quantizer, lab, gens, generator, cfg=cfg, top_k=top_k, top_p=top_p,
                       temperature=temperature, use_cache=use_cache, amp=amp, logits_hook=logits_hook)


def _sample(var: VAR, quantizer: VARQuantizer, lab: Tensor, gens: Optional[List[torch.Generator]],
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
        if gens is not None:  # per-image seeds: draw among the candidates that survive filtering
            probs, cand = filtered_candidates(guided.view(B, n, P, K), top_k, top_p, temperature)
            ids = _draw_candidates(probs, cand, gens)  # [B, P, n]
        else:  # upstream order over the full vocabulary (token parity with the reference)
            filtered = filter_logits(guided.view(B, n, P, K), top_k, top_p, temperature)
            ids = _draw(filtered.softmax(dim=-1), generator)
        ids_all.append(ids)
        f_hat, nxt = quantizer.var_next(si, f_hat, ids)
        if si + 1 < var.num_scales:
            if nxt is None:
                raise RuntimeError("quantizer.var_next returned no next input before the last scale")
            x = var.embed_scale(nxt, si + 1, lvl_pos)
            x = torch.cat([x, x], dim=0)
    return SampleOutput(tokens=torch.cat(ids_all, dim=-1), f_hat=f_hat)
