"""Absolute position-embedding grid resampling (tokenizer spec §2.3).

The latent tokens of the ViT encoder/decoder receive the backbone's pos-embed grid resampled to the latent grid
(e.g. 16×16 → 11×11) with antialiased bicubic interpolation (``F.interpolate(mode="bicubic", align_corners=False,
antialias=True)``), which is the PIL-style separable filter with the Keys kernel at a = −0.5 described in the spec.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def grid_of(num_tokens: int) -> int:
    """Side of a square token grid; ValueError when ``num_tokens`` is not a perfect square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def resample_pos_grid(
    pos: torch.Tensor, out_h: int, out_w: int, in_hw: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """Resample a row-major pos-embed grid ``[1, G·G, C] -> [1, out_h·out_w, C]`` (no prefix/cls slots).

    fp32 antialiased bicubic (align_corners False); returns ``pos`` unchanged when the size does not change.
    ``in_hw`` gives the source grid for non-square inputs (default: square ``G×G``). Output dtype = input dtype.
    """
    if pos.dim() != 3:
        raise ValueError(f"expected a pos grid [1, G*G, C], got shape {tuple(pos.shape)}")
    gh, gw = in_hw if in_hw is not None else (grid_of(pos.shape[1]),) * 2
    if gh * gw != pos.shape[1]:
        raise ValueError(f"pos grid {gh}x{gw} does not match {pos.shape[1]} slots")
    if (gh, gw) == (out_h, out_w):
        return pos
    c = pos.shape[-1]
    grid = pos.float().reshape(pos.shape[0], gh, gw, c).permute(0, 3, 1, 2)
    with torch.autocast(device_type=pos.device.type, enabled=False):
        out = F.interpolate(grid, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
    return out.permute(0, 2, 3, 1).reshape(pos.shape[0], out_h * out_w, c).to(pos.dtype)
