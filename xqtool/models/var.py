"""VAR: class-conditional next-scale prediction transformer (spec var.md §2).

Shapes: B batch, C width, H heads, L = Σ pn² tokens over all scales, V = P·K logits (one K-wide block per
product branch, branch 0 first), Cvae = P·D (word_embed input: branch vectors concatenated, branch 0 first).

Parameter names follow the released checkpoint layout (spec §5) so official files load 1:1. The derived
buffers (``lvl_1L``, ``zero_k_bias``) are non-persistent and the block-causal mask is built on the fly
(spec §7.4): they never appear in a state_dict.

Condition dropout depends on an explicit flag (default: ``self.training``; spec §7.15). Passing
``drop_cond=True`` reproduces upstream exactly: B uniforms from the global RNG of the label's device,
the first draw of the forward.

The KV cache is an explicit :class:`KVCache` object passed by the caller (no hidden module state, so an
exception can never leave a stale cache behind; spec §7.7).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor

from xqtool.config import PRESET_DEPTHS, VARModelConfig, validate_var_model_config, var_preset
from xqtool.models.packed_linear import PackedLinear, packing_available

__all__ = ["VAR", "KVCache", "build_var", "block_causal_mask", "level_index"]


def level_index(patch_nums: Sequence[int]) -> Tensor:
    """Scale index of every position: LongTensor [L] (repeated scales get their own index)."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """Boolean [L, L] mask, True where query i may attend key j (level(j) <= level(i))."""
    lvl = level_index(patch_nums).to(device)
    return lvl.view(1, -1) <= lvl.view(-1, 1)


class KVCache:
    """Keys (L2-normalised, unscaled) and values of earlier scales, one entry per block: [B, H, T, hd].

    With ``capacity`` (the full sequence length L), each layer's k/v live in one buffer [B, H, capacity, hd]
    allocated on the first :meth:`extend`; every step writes its slice and attention reads the filled prefix
    (a view), so no scale re-copies the whole cache. Without it, k/v grow by concatenation.
    """

    def __init__(self, num_layers: int, capacity: Optional[int] = None) -> None:
        self.capacity = capacity
        self.k: List[Optional[Tensor]] = [None] * num_layers
        self.v: List[Optional[Tensor]] = [None] * num_layers
        self._len: List[int] = [0] * num_layers

    def extend(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Append this step's k, v [B, H, t, hd] and return the full cached k, v [B, H, T+t, hd]."""
        t0 = self._len[layer]
        t1 = t0 + int(k.shape[2])
        if self.capacity is None:
            if self.k[layer] is not None:
                k = torch.cat([self.k[layer], k], dim=2)
                v = torch.cat([self.v[layer], v], dim=2)
            self.k[layer], self.v[layer] = k, v
            self._len[layer] = t1
            return k, v
        if t1 > self.capacity:
            raise ValueError(f"KV cache overflow: {t1} positions > capacity {self.capacity}")
        if self.k[layer] is None:
            b, h, _, d = k.shape
            self.k[layer] = k.new_empty(b, h, self.capacity, d)
            self.v[layer] = v.new_empty(b, h, self.capacity, v.shape[-1])
        kb, vb = self.k[layer], self.v[layer]
        kb[:, :, t0:t1].copy_(k)
        vb[:, :, t0:t1].copy_(v)
        self._len[layer] = t1
        return kb[:, :, :t1], vb[:, :, :t1]

    @property
    def length(self) -> int:
        """Number of cached positions (0 when empty)."""
        return self._len[0]


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/v biases and (optionally) L2-normalised q, k and a learned per-head scale."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim), persistent=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        # (qkv with its q/0/v bias, proj) while :meth:`VAR.packed_linears` is active; never in the state dict
        self.packed: Optional[Tuple[PackedLinear, PackedLinear]] = None

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        """x [B, T, C] → [B, T, C]. `attn_mask` bool [T, S] (True = attend) or None; `cache` appends this k, v."""
        b, t, c = x.shape
        packed = self.packed if not torch.is_grad_enabled() else None
        if packed is not None:
            qkv = packed[0](x)
        else:
            qkv = F.linear(x, self.mat_qkv.weight, torch.cat([self.q_bias, self.zero_k_bias, self.v_bias]))
        qkv = qkv.view(b, t, 3, self.num_heads, self.head_dim)
        # split/unbind rather than slicing: their backwards concatenate the pieces' gradients into one
        # buffer, where select/slice backwards would each zero-fill a full-size qkv gradient
        qk, v = qkv.split((2, 1), dim=2)
        v = v.squeeze(2).transpose(1, 2)  # [B, H, T, hd]
        if self.attn_l2_norm:
            # q and k normalised by one kernel pair (same per-vector arithmetic as two F.normalize calls)
            q, k = F.normalize(qk, dim=-1).unbind(2)  # [B, T, H, hd] each
            scale = self.scale_mul_1H11.clamp(max=self.max_scale_mul).exp()
            q = q.transpose(1, 2)
            # in place only without autograd: an in-place multiply of a view makes autograd copy the base
            q = (q.mul_(scale) if not torch.is_grad_enabled() else q * scale).to(v.dtype)
            k = k.transpose(1, 2).to(v.dtype)
        else:
            q, k = (u.transpose(1, 2) for u in qk.unbind(2))
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, c)
        return packed[1](out) if packed is not None else self.proj(out)


class FFN(nn.Module):
    """fc1 (C → hidden) → GELU(tanh) → fc2 (hidden → C)."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)
        # (fc1 with GELU(tanh) fused, fc2) while :meth:`VAR.packed_linears` is active; never in the state dict
        self.packed: Optional[Tuple[PackedLinear, PackedLinear]] = None

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] → [B, T, C]."""
        if self.packed is not None and not torch.is_grad_enabled():
            return self.packed[1](self.packed[0](x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Transformer block modulated by the class condition (AdaLN: gamma1, gamma2, scale1, scale2, shift1, shift2)."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 norm_eps: float, shared_aln: bool, attn_l2_norm: bool) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.shared_aln = shared_aln
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def modulation(self, cond: Tensor) -> Tensor:
        """cond [B, D] (or the shared AdaLN output [B, 1, 6, C]) → modulation [B, 1, 6, C]."""
        if self.shared_aln:
            return cond + self.ada_gss
        return self.ada_lin(cond).view(-1, 1, 6, self.embed_dim)

    def forward(self, x: Tensor, mod: Tensor, attn_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        """x [B, T, C], mod [B, 1, 6, C] (from :meth:`modulation`) → [B, T, C]."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        # in-place gamma products only without autograd: with it, mul_ would first clone its input for the
        # gamma gradient (the out-of-place product keeps a reference instead)
        if torch.is_grad_enabled():
            x = x + self.drop_path(self.attn(h, attn_mask, cache, layer) * gamma1)
            h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
            return x + self.drop_path(self.ffn(h) * gamma2)
        x = x + self.drop_path(self.attn(h, attn_mask, cache, layer).mul_(gamma1))
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        x = x + self.drop_path(self.ffn(h).mul_(gamma2))
        return x


class AdaLNBeforeHead(nn.Module):
    """LN(h)·(1 + scale) + shift with (scale, shift) from the condition (fp32)."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def modulation(self, cond: Tensor) -> Tensor:
        """cond [B, D] → [B, 1, 2, C]."""
        return self.ada_lin(cond).view(-1, 1, 2, self.embed_dim)

    def forward(self, h: Tensor, mod: Tensor) -> Tensor:
        """h [B, T, C] → [B, T, C] (fp32 LayerNorm)."""
        scale, shift = mod.unbind(2)
        return self.ln_wo_grad(h.float()).mul(scale.add(1)).add_(shift)


class VAR(nn.Module):
    """Next-scale prediction transformer over multi-scale, product-quantised token maps.

    Public attributes: ``config``, ``patch_nums``, ``L``, ``first_l``, ``begin_ends`` (per-scale (start, end)),
    ``num_classes`` (the extra null class has index ``num_classes``), ``depth``, ``C``, ``V``, ``Cvae``,
    ``num_branches``, ``codebook_size``.
    """

    def __init__(self, config: VARModelConfig) -> None:
        super().__init__()
        cfg = validate_var_model_config(config)
        self.config = cfg
        self.depth, self.C, self.num_heads = cfg.depth, cfg.embed_dim, cfg.heads
        self.patch_nums: Tuple[int, ...] = tuple(cfg.patch_nums)
        self.num_scales = len(self.patch_nums)
        self.L = cfg.seq_len
        self.first_l = self.patch_nums[0] ** 2
        ends = list(itertools.accumulate(p * p for p in self.patch_nums))
        self.begin_ends: List[Tuple[int, int]] = [(e - p * p, e) for e, p in zip(ends, self.patch_nums)]
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self.num_branches, self.codebook_size = cfg.num_branches, cfg.codebook_size
        self.V, self.Cvae = cfg.vocab_size, cfg.cvae
        self.p_drop = cfg.p_drop
        self.p_drop_scale = 1.0  # the trainer sets 1 - epoch/epochs (spec §2.8)
        c = self.C
        std = math.sqrt(1 / c / 3)
        self.init_std = cfg.init_std if cfg.init_std >= 0 else std

        self.word_embed = nn.Linear(self.Cvae, c)
        self.class_emb = nn.Embedding(self.num_classes + 1, c)
        nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=std)
        tables = []
        for pn in self.patch_nums:
            t = torch.empty(1, pn * pn, c)
            nn.init.trunc_normal_(t, mean=0, std=std)
            tables.append(t)
        self.pos_1LC = nn.Parameter(torch.cat(tables, dim=1))
        self.lvl_embed = nn.Embedding(self.num_scales, c)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=std)
        if cfg.p_drop > 0:
            self.empty_emb = nn.Embedding(1, c)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        dpr = [cfg.dpr * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(c, c, self.num_heads, cfg.mlp_ratio, dpr[i], cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm)
            for i in range(cfg.depth)
        ])
        self.head_nm = AdaLNBeforeHead(c, c, cfg.norm_eps)
        self.head = nn.Linear(c, self.V)
        self.register_buffer("lvl_1L", level_index(self.patch_nums).view(1, self.L), persistent=False)
        self._mask_cache: Optional[Tensor] = None
        self.packed_head: Optional[PackedLinear] = None
        self.packed_dtype: Optional[torch.dtype] = None  # set while packed_linears() is active
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Spec §2.5: trunc-normal Linear/Embedding, scaled head and AdaLN rows, depth-scaled output projections."""
        cfg, c = self.config, self.C
        std = self.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, mean=0, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, mean=0, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        div = math.sqrt(2 * self.depth)
        for block in self.blocks:
            block.attn.proj.weight.div_(div)
            block.ffn.fc2.weight.div_(div)
            if hasattr(block, "ada_lin"):
                w = block.ada_lin[-1].weight
                w[2 * c:].mul_(cfg.init_adaln)
                w[:2 * c].mul_(cfg.init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if block.attn.attn_l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))

    # ------------------------------------------------------------------ pieces shared by training and sampling
    def attn_mask(self, device: torch.device) -> Tensor:
        """Block-causal bool mask [L, L] on `device` (cached)."""
        if self._mask_cache is None or self._mask_cache.device != device:
            self._mask_cache = block_causal_mask(self.patch_nums, device)
        return self._mask_cache

    def lvl_pos(self) -> Tensor:
        """Level + position embedding of every position: [1, L, C]."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def class_cond(self, labels: Tensor) -> Tensor:
        """labels [B] (index ``num_classes`` = null) → condition [B, C]."""
        return self.class_emb(labels)

    def block_modulations(self, cond: Tensor) -> List[Tensor]:
        """Per-block AdaLN modulation [B, 1, 6, C] from cond [B, C]; computed once per sampling call."""
        if self.config.shared_aln:
            shared = self.shared_ada_lin(cond).view(-1, 1, 6, self.C)
            return [blk.modulation(shared) for blk in self.blocks]
        return [blk.modulation(cond) for blk in self.blocks]

    def run_blocks(self, x: Tensor, mods: Sequence[Tensor], attn_mask: Optional[Tensor] = None,
                   cache: Optional[KVCache] = None) -> Tensor:
        """x [B, T, C] through all blocks → [B, T, C]."""
        for i, block in enumerate(self.blocks):
            x = block(x, mods[i], attn_mask, cache, i)
        return x

    def logits(self, h: Tensor, head_mod: Tensor) -> Tensor:
        """h [B, T, C], head modulation [B, 1, 2, C] → fp32 logits [B, T, V]."""
        head = self.packed_head if self.packed_head is not None and not torch.is_grad_enabled() else self.head
        return head(self.head_nm(h, head_mod)).float()

    @contextlib.contextmanager
    def packed_linears(self, dtype: torch.dtype = torch.float32, rows_hint: int = 256) -> Iterator[bool]:
        """Frozen CPU inference: run the blocks' and the head's linears on oneDNN pre-packed `dtype` weights,
        with the FFN's GELU fused (see :mod:`xqtool.models.packed_linear`). Yields True when packing is active,
        False when it is not available here (the model then runs as usual).

        Packing costs one weight reorder (about 0.4 s and one extra copy of the linear weights for d17), so
        wrap a whole sampling loop, not one batch. The parameters are untouched; edits made to them inside the
        context are not seen until it is re-entered. bf16 packing gives bf16 outputs like autocast's linears.
        """
        if self.packed_dtype is not None or not packing_available(self.pos_1LC.device, dtype):
            yield self.packed_dtype == dtype
            return
        try:
            with torch.no_grad():
                for blk in self.blocks:
                    a, f = blk.attn, blk.ffn
                    qkv_bias = torch.cat([a.q_bias, a.zero_k_bias, a.v_bias])
                    a.packed = (PackedLinear(a.mat_qkv.weight, qkv_bias, dtype=dtype, rows_hint=rows_hint),
                                PackedLinear(a.proj.weight, a.proj.bias, dtype=dtype, rows_hint=rows_hint))
                    f.packed = (PackedLinear(f.fc1.weight, f.fc1.bias, "gelu_tanh", dtype, rows_hint),
                                PackedLinear(f.fc2.weight, f.fc2.bias, dtype=dtype, rows_hint=rows_hint))
                self.packed_head = PackedLinear(self.head.weight, self.head.bias, dtype=dtype, rows_hint=rows_hint)
            self.packed_dtype = dtype
            yield True
        finally:
            for blk in self.blocks:
                blk.attn.packed = blk.ffn.packed = None
            self.packed_head, self.packed_dtype = None, None

    def start_tokens(self, cond: Tensor) -> Tensor:
        """First-scale input [B, first_l, C] = class embedding + pos_start + level/position embedding."""
        sos = cond.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start
        return sos + self.lvl_pos()[:, : self.first_l]

    def embed_scale(self, features: Tensor, si: int, lvl_pos: Optional[Tensor] = None) -> Tensor:
        """Teacher-forcing / next-scale features [B, pn_si², Cvae] of scale si (≥ 1) → input tokens [B, pn², C].

        `lvl_pos` [1, L, C]: a precomputed :meth:`lvl_pos` (sampling computes it once per call).
        """
        b, e = self.begin_ends[si]
        table = self.lvl_pos() if lvl_pos is None else lvl_pos
        return self.word_embed(features.float()) + table[:, b:e]

    # ------------------------------------------------------------------ teacher forcing
    def drop_labels(self, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Replace each label by the null class with probability cond_drop_rate (B uniforms, batch order)."""
        u = torch.rand(labels.shape[0], device=labels.device, generator=generator)
        return torch.where(u < self.cond_drop_rate, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, x_BLCv: Tensor, *, drop_cond: Optional[bool] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Teacher-forcing logits.

        Args:
            labels: LongTensor [B] class ids (``num_classes`` = unconditional).
            x_BLCv: next-scale inputs [B, L - first_l, Cvae] (``quantizer.var_input(tokens)``).
            drop_cond: condition dropout on/off; None → ``self.training``. True in eval mode = upstream behaviour.
            generator: RNG for the dropout uniforms (None = global RNG of the labels' device, like upstream).
        Returns:
            fp32 logits [B, L, V]; columns [p·K, (p+1)·K) belong to branch p.
        """
        drop = self.training if drop_cond is None else drop_cond
        dev_type = x_BLCv.device.type
        with torch.autocast(dev_type, enabled=False):
            if drop and self.cond_drop_rate > 0:
                labels = self.drop_labels(labels, generator)
            cond = self.class_cond(labels)
            b = labels.shape[0]
            sos = cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start
            tok = self.word_embed(x_BLCv.float())
            if self.training and self.p_drop > 0:
                rate = float(torch.rand(()).item()) * self.p_drop * self.p_drop_scale
                hit = torch.rand(tok.shape[:2], device=tok.device) < rate
                tok = torch.where(hit.unsqueeze(-1), self.empty_emb.weight.view(1, 1, -1), tok)
            x = torch.cat([sos, tok], dim=1) + self.lvl_pos()
        cond_blocks = cond
        if torch.is_autocast_enabled(dev_type):
            dt = torch.get_autocast_dtype(dev_type)
            x, cond_blocks = x.to(dt), cond.to(dt)
        mods = self.block_modulations(cond_blocks)
        h = self.run_blocks(x, mods, self.attn_mask(x.device))
        return self.logits(h, self.head_nm.modulation(cond))


def build_var(config: "VARModelConfig | str", device: "torch.device | str | None" = None) -> VAR:
    """Build a randomly initialised VAR from a config or a preset name (d16, d17, d20, d24, d30).

    ``device="meta"`` builds a shape-only model (no memory, no init cost) for counting / layout checks.
    """
    cfg = var_preset(config) if isinstance(config, str) else config
    if device is None:
        return VAR(cfg)
    with torch.device(device):
        return VAR(cfg)


PRESETS = tuple(PRESET_DEPTHS)
