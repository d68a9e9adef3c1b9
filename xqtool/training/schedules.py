"""Learning-rate, weight-decay and annealing schedules of both trainers (one module; spec tokenizer.md §5.6,
var.md §1.3, tokenizer.md §3.6).

Tokenizer, per optimizer step (:func:`warmup_cosine_factor`): linear warm-up, then cosine to ``min_lr`` or
constant; peak lr scaled by :func:`scaled_lr`.

Tokenizer, per epoch as the reference (:func:`per_epoch_factors`, ``train.lr_schedule: epoch``): the reference
builds timm schedulers (``create_scheduler_v2``: cosine, ``warmup_prefix`` False, one cycle) and steps them once
per epoch with ``step(epoch + 1)``, so the lr during epoch ``e`` is the scheduler's value at ``t = e``
(``t = 0``: the value set at construction):

* ``t < W`` (warm-up): ``warmup_lr + t · (base − warmup_lr) / W`` (``t = 0`` gives ``warmup_lr``, timm's 1e-5);
* ``W ≤ t < T``: ``min_lr + ½ (base − min_lr) (1 + cos(π t / T))`` (the cosine counts from t = 0, not from W);
* ``t ≥ T``: ``min_lr``.

Generator: T = ``epochs``, W = ``warmup_epochs`` (1). Discriminator: T = ``epochs − disc_epoch_start``,
W = ⌊0.02 · epochs⌋, and ``t = epoch − disc_epoch_start`` (0 before the discriminator starts: it is stepped only
from ``disc_epoch_start`` on, with the argument ``epoch + 1 − disc_epoch_start``).

VAR (:func:`var_lr_factor`, :func:`wd_value`, :func:`cond_drop_scale`): warm-up from ``warmup_start``, then
``lin0``/``lin``/``lin00``/``cos``/``constant`` decay to ``final_lr_ratio``; cosine weight-decay schedule;
condition-dropout annealing.

RobustTok (:func:`robusttok_perturbation`): the annealed latent perturbation handed to the tokenizer's training
forward.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

from xqtool.errors import ConfigError
from xqtool.models.tokenizer import LatentPerturbation
from xqtool.quantize.perturb import perturbation_schedule


# ---------------------------------------------------------------------------------------------- tokenizer, per step
def scaled_lr(lr: float, global_batch: int, rule: str) -> float:
    """Spec §5.6: ``batch/128`` → lr·global_batch/128; ``none`` → lr."""
    return lr * global_batch / 128.0 if rule == "batch/128" else lr


def warmup_cosine_factor(step: int, *, total: int, warmup: int, kind: str, base: float, min_lr: float,
                         start: int = 0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) for a schedule starting at `start`.

    Linear warm-up over `warmup` steps, then ``cosine`` (to `min_lr`, clamped to ≤ base) or ``constant``/``none``.
    """
    s = step - start
    if s < 0:
        return 0.0
    if warmup > 0 and s < warmup:
        return (s + 1) / warmup
    if kind != "cosine":
        return 1.0
    span = max(1, total - start - warmup)
    progress = min(1.0, (s - warmup) / span)
    floor = min(min_lr, base) / base if base > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- tokenizer, per epoch


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


# ---------------------------------------------------------------------------------------------- VAR
def var_lr_factor(it: int, warmup_it: int, max_it: int, schedule: str = "lin0", wp0: float = 0.005,
                  wpe: float = 0.01) -> float:
    """VAR lr multiplier at optimizer step `it` (spec var.md §1.3); ConfigError for an unknown `schedule`."""
    if it < warmup_it:
        return wp0 + (1 - wp0) * it / warmup_it
    if schedule == "constant":
        return 1.0
    denom = max(max_it - 1 - warmup_it, 1)
    p = min(max((it - warmup_it) / denom, 0.0), 1.0)
    if schedule == "lin0":
        return 1.0 if p < 0.05 else wpe + (1 - wpe) * (1 - p) / 0.95
    if schedule == "lin":
        return 1.0 if p < 0.15 else wpe + (1 - wpe) * (1 - p) / 0.85
    if schedule == "lin00":
        return wpe + (1 - wpe) * (1 - p)
    if schedule == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * p))
    raise ConfigError(f"unknown schedule '{schedule}'")


def wd_value(it: int, max_it: int, wd: float, wd_end: float) -> float:
    """Weight decay at step `it`: cosine from `wd` to `wd_end` (wd_end 0 → constant `wd`)."""
    if wd_end <= 0:
        return wd
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / max(max_it - 1, 1)))


def cond_drop_scale(step: int, iters_per_epoch: int, epochs: int) -> float:
    """Multiplier of VAR's condition-dropout rate at optimizer step `step` (spec var.md §2.8): 1 → 0 linearly over
    ``epochs`` epochs of ``iters_per_epoch`` steps (never below 0)."""
    return max(1.0 - (step / iters_per_epoch) / max(epochs, 1), 0.0)


# ---------------------------------------------------------------------------------------------- RobustTok
def robusttok_perturbation(quant: Any, epoch: int) -> Optional[LatentPerturbation]:
    """The annealed latent perturbation of spec tokenizer.md §3.6 during `epoch` (0-based) for a ``QuantConfig``.

    None when RobustTok is off (``quant.alpha`` or ``quant.beta`` is 0); otherwise ``(alpha_e, beta, delta_e)`` of
    :func:`xqtool.quantize.perturb.perturbation_schedule` (the tokenizer applies it only to a single-scale
    quantizer in training mode).
    """
    if not (quant.alpha > 0 and quant.beta > 0):
        return None
    alpha, delta = perturbation_schedule(epoch, quant.alpha, quant.delta, quant.anneal_start, quant.anneal_end,
                                         quant.end_ratio)
    return LatentPerturbation(alpha=alpha, beta=quant.beta, delta=delta)


__all__ = ["cond_drop_scale", "disc_warmup_epochs", "epoch_lr", "per_epoch_factors", "robusttok_perturbation", "scaled_lr",
           "var_lr_factor", "warmup_cosine_factor", "wd_value"]
