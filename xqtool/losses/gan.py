"""GAN losses for tokenizer training (spec §5.1, §5.5).

Discriminator losses take real/fake logits (any shape, e.g. ``[B, 1, h, w]`` for PatchGAN or
``[B, 980]`` for the DINO discriminator) and return a scalar.  Variants:

* ``hinge``:           ½(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))
* ``vanilla``:         ½(mean softplus(−D(x)) + mean softplus(D(x̂)))
* ``non_saturating``:  BCE-with-logits of D(x) against 1 and D(x̂) against 0, averaged — the same
  value as ``vanilla`` (kept as its own name for config compatibility).

Generator losses take fake logits:

* ``hinge``:           −mean D(x̂)
* ``non_saturating``:  mean softplus(−D(x̂))  (= BCE-with-logits(D(x̂), 1) with the arguments in the
  right order; the reference swaps them, spec §9.10)
* ``vanilla``:         the minimax form mean(−softplus(D(x̂))) = −BCE(D(x̂), 0).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqtool.errors import ConfigError

GAN_LOSSES = ("hinge", "vanilla", "non_saturating")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (scalar)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Logistic (vanilla) discriminator loss (scalar)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """BCE-with-logits discriminator loss: real against ones, fake against zeros (scalar)."""
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Hinge generator loss −mean D(x̂)."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss mean softplus(−D(x̂)) (logits first, targets second)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def vanilla_g_loss(logits_fake: Tensor) -> Tensor:
    """Minimax generator loss −mean softplus(D(x̂)) (saturating form)."""
    return -F.softplus(logits_fake).mean()


_D_LOSSES: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non_saturating": non_saturating_d_loss,
}
_G_LOSSES: Dict[str, Callable[[Tensor], Tensor]] = {
    "hinge": hinge_g_loss,
    "vanilla": vanilla_g_loss,
    "non_saturating": non_saturating_g_loss,
}


def _check(kind: str, field: str) -> str:
    if kind not in GAN_LOSSES:
        raise ConfigError(f"loss.{field} must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")
    return kind


def disc_loss_fn(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The discriminator loss function for `kind` (``hinge``|``vanilla``|``non_saturating``)."""
    return _D_LOSSES[_check(kind, "disc_loss")]


def gen_loss_fn(kind: str) -> Callable[[Tensor], Tensor]:
    """The generator adversarial loss function for `kind`."""
    return _G_LOSSES[_check(kind, "gen_loss")]


def disc_weight_at(step: int, disc_start: int, disc_weight: float) -> float:
    """GAN weight at (1-based) `step`: `disc_weight` once ``step >= disc_start``, else 0."""
    return float(disc_weight) if step >= disc_start else 0.0


def adaptive_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_value: float = 1e4,
    reduce_grads: Optional[Callable[..., Sequence[Tensor]]] = None,
) -> Tensor:
    """λ = ‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), clamped to [0, max_value], detached (spec §5.1).

    Args:
        nll_loss: scalar reconstruction (+ perceptual) loss, still attached to the graph.
        g_loss: scalar generator adversarial loss, attached to the graph.
        last_layer: the decoder's last weight ``W`` (a leaf parameter).
        reduce_grads: maps (∇nll, ∇g) to their mean over processes (``xqtool.distributed.mean_across``),
            so λ is the global batch's under DDP; None: this process's batch only.
    Returns:
        a 0-dim detached tensor.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if reduce_grads is not None:
        nll_grads, g_grads = reduce_grads(nll_grads, g_grads)
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, max_value).detach()


def adaptive_weight_at_output(
    nll_loss: Tensor, g_loss: Tensor, output: Tensor, last_layer: Tensor, max_value: float = 1e4,
    reduce_grads: Optional[Callable[..., Sequence[Tensor]]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The adaptive weight λ of :func:`adaptive_weight` (spec §5.1), plus the two losses' gradients at `output`.

    Both losses must depend on the generator's parameters only through `output` (the decoder's image,
    computed with `last_layer`). Each loss is differentiated once down to `output` (LPIPS-VGG and
    discriminator backwards run here, once); from there only the short path back to `last_layer` runs
    twice. The returned output gradients let the caller finish the generator backward from `output`
    (e.g. ``(output * (g_nll + c·g_adv)).sum()``) instead of running those networks' backwards again:
    the same parameter gradients to float rounding.

    Args:
        nll_loss, g_loss: scalars attached to the graph through `output`.
        output: the generator's image ``[B, 3, H, W]`` (non-leaf, requires grad).
        last_layer: the decoder's last weight (a leaf parameter used to compute `output`).
        reduce_grads: as in :func:`adaptive_weight` (global-batch λ under DDP).
    Returns:
        (λ detached 0-dim, ∂nll/∂output, ∂g/∂output), the gradients detached with `output`'s shape.
    """
    g_nll = torch.autograd.grad(nll_loss, output, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, output, retain_graph=True)[0]
    nll_grads = torch.autograd.grad(output, last_layer, grad_outputs=g_nll, retain_graph=True)[0]
    g_grads = torch.autograd.grad(output, last_layer, grad_outputs=g_adv, retain_graph=True)[0]
    if reduce_grads is not None:
        nll_grads, g_grads = reduce_grads(nll_grads, g_grads)
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, max_value).detach(), g_nll, g_adv


class LeCam(nn.Module):
    """LeCam regulariser (spec §5.5) with EMA scalars of the mean real / fake logits.

    ``update(real, fake)`` moves the EMAs (decay 0.999, init 0) from the current batch; call it
    every step before :meth:`forward`. ``forward(real, fake)`` returns
    mean(relu(D(x) − ema_fake)²) + mean(relu(ema_real − D(x̂))²). The EMAs are buffers, so they
    are saved with the discriminator's training state and restored on resume.
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """EMA update from the batch means (logits of any shape)."""
        d = self.decay
        self.ema_real.mul_(d).add_((1 - d) * logits_real.detach().float().mean())
        self.ema_fake.mul_(d).add_((1 - d) * logits_fake.detach().float().mean())

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """The regulariser (scalar)."""
        return (
            F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        )


__all__ = [
    "GAN_LOSSES",
    "LeCam",
    "adaptive_weight",
    "disc_loss_fn",
    "disc_weight_at",
    "gen_loss_fn",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
]
