"""Training losses: GAN (hinge / vanilla / non-saturating, adaptive weight, LeCam), semantic
distillation (InfoNCE against a frozen teacher), DiffAug, softmax cross-entropy with a one-pass backward
(VAR), and LPIPS (``xqtool.losses.lpips``).

Owns loss formulas and the frozen networks inside them (VGG of LPIPS). May import ``errors`` and ``hub``
(LPIPS weights by name); never ``models``, ``tasks``, ``training`` or ``cli``.
"""

from xqtool.losses.cross_entropy import softmax_cross_entropy
from xqtool.losses.diffaug import DiffAug, fade_blur_schedule
from xqtool.losses.gan import (
    GAN_LOSSES,
    LeCam,
    adaptive_weight,
    adaptive_weight_at_output,
    disc_loss_fn,
    disc_weight_at,
    gen_loss_fn,
)
from xqtool.losses.semantic import SemanticDistillLoss, clip_infonce, semantic_scale

__all__ = [
    "GAN_LOSSES",
    "DiffAug",
    "LeCam",
    "SemanticDistillLoss",
    "adaptive_weight",
    "adaptive_weight_at_output",
    "clip_infonce",
    "disc_loss_fn",
    "disc_weight_at",
    "fade_blur_schedule",
    "gen_loss_fn",
    "semantic_scale",
    "softmax_cross_entropy",
]
