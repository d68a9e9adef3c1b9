"""Per-epoch learning-rate schedules of the reference tokenizer trainer (spec tokenizer.md §5.6).

The reference builds timm schedulers (``create_scheduler_v2``: cosine, ``warmup_prefix`` False, one cycle) and
steps them once per epoch with ``step(epoch + 1)``, so the lr during epoch ``e`` is the scheduler's value at
``t = e`` (``t = 0``: the value set at construction):

* ``t < W`` (warm-up): ``warmup_lr + t · (base − warmup_lr) / W`` (``t = 0`` gives ``warmup_lr``, timm's 1e-5);
* ``W ≤ t < T``: ``min_lr + ½ (base − min_lr) (1 + cos(π t / T))`` (the cosine counts from t = 0, not from W);
* ``t ≥ T``: ``min_lr``.

Generator: T = ``epochs``, W = ``warmup_epochs`` (1). Discriminator: T = ``epochs − disc_epoch_start``,
W = ⌊0.02 · epochs⌋, and ``t = epoch − disc_epoch_start`` (0 before the discriminator starts: it is stepped only
from ``disc_epoch_start`` on, with the argument ``epoch + 1 − disc_epoch_start``).
"""

from __future__ import annotations

import math


def epoch_lr(t: int, *, base: float, epochs: int, warmup_epochs: int, warmup_lr: float = 1e-5,
             min_lr: float = 5e-5, kind: str = "cosine") -> float:
    """Learning rate (absolute, same unit as `base`) during scheduler epoch ``t`` (0-based).

    `kind` ``cosine`` follows the module docstring; ``constant`` / ``none`` keep the same warm-up, then `base`.
    """
    t = max(0, int(t))
    if warmup_epochs > 0 and t < warmup_epochs:
        return warmup_lr + t * (base - warmup_lr) / warmup_epochs
    if kind != "cosine":
        return base
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * t / max(1, epochs)))


def disc_warmup_epochs(epochs: int) -> int:
    """The reference's discriminator warm-up, ⌊0.02 · epochs⌋ epochs (4 for 200 epochs)."""
    return int(math.floor(0.02 * epochs))


__all__ = ["epoch_lr", "disc_warmup_epochs"]
