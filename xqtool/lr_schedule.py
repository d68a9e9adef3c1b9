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
from typing import Any, Callable, Tuple


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


def per_epoch_factors(train: Any, steps_per_epoch: int, g_lr: float, d_lr: float,
                      disc_start_step: int) -> Tuple[Callable[[int], float], Callable[[int], float]]:
    """``LambdaLR`` factors (generator, discriminator) of the per-epoch schedules for a ``TrainConfig``.

    The generator's argument is the number of optimizer steps taken (epoch = steps // steps_per_epoch); the
    discriminator's the number of discriminator steps taken (they begin at `disc_start_step`), so its epoch
    counts from disc_epoch_start as in the reference. Uses ``train.epochs``, ``warmup_epochs``, ``warmup_lr``,
    ``min_lr``, ``lr_scheduler`` and ``disc_warmup_epochs`` (-1: ⌊0.02·epochs⌋).
    """
    spe = max(1, int(steps_per_epoch))
    d_epochs = max(1, int(train.epochs) - disc_start_step // spe)
    d_warm = train.disc_warmup_epochs if train.disc_warmup_epochs >= 0 else disc_warmup_epochs(train.epochs)

    def gen(s: int) -> float:
        lr = epoch_lr(s // spe, base=g_lr, epochs=train.epochs, warmup_epochs=train.warmup_epochs,
                      warmup_lr=train.warmup_lr, min_lr=train.min_lr, kind=train.lr_scheduler)
        return lr / g_lr if g_lr > 0 else 0.0

    def disc(s: int) -> float:
        lr = epoch_lr(s // spe, base=d_lr, epochs=d_epochs, warmup_epochs=d_warm, warmup_lr=train.warmup_lr,
                      min_lr=train.min_lr, kind=train.lr_scheduler)
        return lr / d_lr if d_lr > 0 else 0.0

    return gen, disc


__all__ = ["epoch_lr", "disc_warmup_epochs", "per_epoch_factors"]
