"""φ refinement convolutions of the multi-scale quantizers (spec tokenizer.md §3.2 step 4).

φ(x) = (1 − r)·x + r·Conv3×3(x) with r = ``quant_resi`` (0.5), conv D→D, zero padding 1, with bias.
A branch holds ``n_phi`` of them under ``quant_resi.qresi_ls.{k}``; scale ``si`` uses the φ whose tick is
nearest to ``si / (S − 1)`` (:func:`phi_index_table`).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch.nn as nn
from torch import Tensor

from xqtool.errors import ConfigError

# Checkpoint-compatible table of the released 10-scale configs: scales 2 and 7 are exact ties between
# two ticks that float64 rounding resolves towards the later tick (spec §3.2 step 4).
_HARDCODED = {(4, 10): (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)}


def num_phi(share_quant_resi: int, num_scales: int) -> int:
    """Number of φ convolutions: ``share_quant_resi`` (0 → one per scale)."""
    if share_quant_resi < 0:
        raise ConfigError(f"quant.share_quant_resi must be >= 0 (0 = one φ per scale), got {share_quant_resi}")
    return num_scales if share_quant_resi == 0 else share_quant_resi


def phi_index_table(num_scales: int, share_quant_resi: int = 4) -> List[int]:
    """φ index used by each scale ``si = 0..S-1``.

    Ticks: ``linspace(1/(3K), 1 − 1/(3K), K)`` for K = 4, else ``linspace(1/(2K), 1 − 1/(2K), K)``;
    scale si takes the nearest tick to ``si/(S−1)`` (first minimum, float64). K = 1 → always 0;
    K = 0 → one φ per scale (identity table); S = 1 → φ 0. (4, 10) is hard-coded: 0,0,1,1,1,2,2,3,3,3.
    """
    k = num_phi(share_quant_resi, num_scales)
    if num_scales == 1 or k == 1:
        return [0] * num_scales
    if share_quant_resi == 0:
        return list(range(num_scales))
    if (k, num_scales) in _HARDCODED:
        return list(_HARDCODED[(k, num_scales)])
    ticks = np.linspace(1 / (3 * k), 1 - 1 / (3 * k), k) if k == 4 else np.linspace(1 / (2 * k), 1 - 1 / (2 * k), k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


class Phi(nn.Conv2d):
    """φ(x) = (1 − r)·x + r·conv3x3(x), x: ``[B, D, h, w]`` → same shape."""

    def __init__(self, dim: int, resi_ratio: float = 0.5) -> None:
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1, bias=True)
        self.resi_ratio = float(abs(resi_ratio))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x.mul(1 - self.resi_ratio) + super().forward(x).mul_(self.resi_ratio)


class PhiBank(nn.Module):
    """The φ convolutions of one branch; ``bank[si]`` returns the φ of scale ``si``.

    State-dict keys: ``qresi_ls.{k}.weight`` ``[D, D, 3, 3]`` and ``qresi_ls.{k}.bias`` ``[D]`` (none when
    ``resi_ratio`` is 0, where φ is the identity).
    """

    def __init__(self, dim: int, num_scales: int, share_quant_resi: int = 4, resi_ratio: float = 0.5) -> None:
        super().__init__()
        n = num_phi(share_quant_resi, num_scales)
        self.qresi_ls = nn.ModuleList(
            [Phi(dim, resi_ratio) if abs(resi_ratio) > 1e-6 else nn.Identity() for _ in range(n)]
        )
        self.table = tuple(phi_index_table(num_scales, share_quant_resi))

    def __getitem__(self, si: int) -> nn.Module:
        return self.qresi_ls[self.table[si]]

    def extra_repr(self) -> str:
        return f"table={self.table}"
