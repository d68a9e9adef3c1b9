"""CNN encoder / decoder (LlamaGen VQ-GAN design, tokenizer spec §2.2).

Submodule names follow the spec so that state_dict keys match the official layout:
``conv_in``, ``conv_blocks.{i}.res.{j}``, ``conv_blocks.{i}.attn.{j}``, ``conv_blocks.{i}.downsample.conv`` /
``conv_blocks.{i}.upsample.conv``, ``mid.{0,1,2}``, ``norm_out``, ``conv_out``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xqtool.errors import ConfigError

_CH_MULT = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}


def cnn_ch_mult(vq_model: str) -> tuple[int, ...]:
    """Channel multipliers of a named CNN factory: ``'VQ-16'`` -> (1,1,2,2,4), ``'VQ-8'`` -> (1,2,2,4)."""
    try:
        return _CH_MULT[vq_model]
    except KeyError:
        raise ConfigError(
            f"unknown vq_model {vq_model!r}: use one of {', '.join(sorted(_CH_MULT))}"
        ) from None


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (32 for every standard width)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6, affine); fewer groups for tiny widths so the count divides ``channels``."""
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x)."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus (1×1 ``nin_shortcut``) residual.

    ``[B, C_in, H, W] -> [B, C_out, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (1×1 q/k/v/proj_out on the GroupNorm'ed input), residual.

    ``[B, C, H, W] -> [B, C, H, W]``; scale C^-0.5 (fused scaled-dot-product attention).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C] (one head)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then 3×3 stride-2 conv (padding 0): ``[B,C,H,W] -> [B,C,H/2,W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv: ``[B,C,H,W] -> [B,C,2H,2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, optional ``attn`` blocks (one after each res), optional resampler
    (``downsample`` in the encoder, ``upsample`` in the decoder, set by the owner)."""

    def __init__(self, block_in: int, block_out: int, num_blocks: int, with_attn: bool, dropout: float) -> None:
        super().__init__()
        res, attn = [], []
        for _ in range(num_blocks):
            res.append(ResnetBlock(block_in, block_out, dropout))
            block_in = block_out
            if with_attn:
                attn.append(AttnBlock(block_in))
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class _ConvStack(nn.Module):
    """What the CNN encoder and decoder share: the validated ``ch_mult``, ``z_channels``, the middle
    (res, attn, res) stack and the output head (``norm_out`` → swish → ``conv_out``).

    Raises ConfigError when ``ch_mult`` is empty or has a non-positive entry.
    """

    def __init__(self, ch_mult: Sequence[int], z_channels: int) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or any(m <= 0 for m in ch_mult):
            raise ConfigError(f"model.ch_mult must be a non-empty list of positive ints, got {list(ch_mult)}")
        self.ch_mult = ch_mult
        self.z_channels = z_channels

    def _init_mid(self, channels: int, dropout: float) -> None:
        self.mid = nn.ModuleList(
            [ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)]
        )

    def _init_out(self, channels: int, out_channels: int) -> None:
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def _run_mid(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.mid:
            h = block(h)
        return h

    def _run_out(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(swish(self.norm_out(h)))


class CNNEncoder(_ConvStack):
    """``[B, in_channels, H, W] -> [B, z_channels, H / 2**(len(ch_mult)-1), W / 2**(len(ch_mult)-1)]``."""

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, dropout: float = 0.0) -> None:
        super().__init__(ch_mult, z_channels)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + self.ch_mult
        levels = []
        for i, m in enumerate(self.ch_mult):
            last = i == len(self.ch_mult) - 1
            level = _Level(ch * in_mult[i], ch * m, num_res_blocks, last, dropout)
            if not last:
                level.downsample = Downsample(ch * m)
            levels.append(level)
        self.conv_blocks = nn.ModuleList(levels)
        block_in = ch * self.ch_mult[-1]
        self._init_mid(block_in, dropout)
        self._init_out(block_in, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self._run_out(self._run_mid(h))


class CNNDecoder(_ConvStack):
    """``[B, z_channels, h, w] -> [B, out_channels, h * 2**(len(ch_mult)-1), …]`` (unbounded output)."""

    def __init__(self, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, dropout: float = 0.0) -> None:
        super().__init__(ch_mult, z_channels)
        block_in = ch * self.ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self._init_mid(block_in, dropout)
        levels = []
        n = len(self.ch_mult)
        for i in range(n):
            block_out = ch * self.ch_mult[n - 1 - i]
            level = _Level(block_in, block_out, num_res_blocks + 1, i == 0, dropout)
            block_in = block_out
            if i != n - 1:
                level.upsample = Upsample(block_in)
            levels.append(level)
        self.conv_blocks = nn.ModuleList(levels)
        self._init_out(block_in, out_channels)

    @property
    def last_layer(self) -> nn.Parameter:
        """``conv_out.weight`` [out_channels, ch·ch_mult[0], 3, 3] (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._run_mid(self.conv_in(z))
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self._run_out(h)
