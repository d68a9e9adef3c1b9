"""The tokenizer's training objectives (spec tokenizer.md §5): generator and discriminator, each ``(loss, logs)``.

Generator (spec §5.1): ``w_rec·L_rec + w_p·LPIPS + λ·w_disc·L_adv + vq + commit + entropy + w_sem·L_sem +
w_detail·L_detail``, λ the adaptive weight (spec §5.4) once the GAN weight is non-zero.
Discriminator (spec §5.5): ``w_disc·(L_D + lecam_weight·R_LeCam)``, trained from ``disc_start`` on (the
reference's pre-start LeCam updates and weight decay on an untrained discriminator are skipped, spec §9.11).

The objective never steps an optimizer and never talks to other processes except through the injected
``reduce_grads`` (mean of the adaptive weight's gradients over processes) and ``mean_across`` (LeCam's EMA).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqtool.losses import (DiffAug, LeCam, SemanticDistillLoss, adaptive_weight, adaptive_weight_at_output,
                           disc_loss_fn, disc_weight_at, fade_blur_schedule, gen_loss_fn, semantic_scale)
from xqtool.models.tokenizer import LatentPerturbation, TokenizerOutput
from xqtool.training.schedules import robusttok_perturbation

# role → (frozen teacher, distillation loss with its projection, "patches" | "cls")
Teachers = Dict[str, Tuple[nn.Module, SemanticDistillLoss, str]]


class TokenizerObjective:
    """Generator and discriminator losses of one micro-batch, for a ``TokenizerConfig``'s ``loss``/``quant``.

    Args:
        cfg: the run's ``TokenizerConfig`` (``loss`` and ``quant`` sections are read).
        model: the bare tokenizer (``last_layer`` for λ, ``quant_conv`` for the distillation projection).
        disc / raw_disc: the discriminator as prepared for training (DDP-wrapped on several processes) and
            unwrapped; None without a GAN.
        lpips: LPIPS module, or None when ``loss.perceptual_weight`` is 0.
        teachers: frozen teachers per role (``semantic``, ``detail``).
        lecam: LeCam regulariser (EMA state), or None.
        disc_start: first optimizer step (1-based) with a non-zero GAN weight.
        steps_per_epoch: for the per-epoch schedules (semantic scale, RobustTok); None → epoch 0.
        autocast: the mixed-precision context (``Accelerator.autocast``).
        exact_adaptive: True when no fp16 loss scaler is active, so λ may use the one-backward form.
        reduce_grads / mean_across: process-mean of tensors (identity on one process).
    """

    def __init__(self, cfg: Any, *, model: nn.Module, disc: Optional[nn.Module], raw_disc: Optional[nn.Module],
                 lpips: Optional[nn.Module], teachers: Teachers, lecam: Optional[LeCam], disc_start: int,
                 steps_per_epoch: Optional[int], autocast: Callable[[], AbstractContextManager],
                 exact_adaptive: bool, reduce_grads: Callable[..., Any], mean_across: Callable[..., Any]) -> None:
        self.lc, self.quant = cfg.loss, cfg.quant
        self.model, self.disc, self.raw_disc = model, disc, raw_disc
        self.lpips, self.teachers, self.lecam = lpips, teachers, lecam
        self.disc_start, self.steps_per_epoch = disc_start, steps_per_epoch
        self.autocast, self.exact_adaptive = autocast, exact_adaptive
        self.reduce_grads, self.mean_across = reduce_grads, mean_across
        self.diffaug = DiffAug(prob=self.lc.aug_prob) if self.lc.disc_type == "dinodisc" else None
        self.g_loss_fn = gen_loss_fn(self.lc.gen_loss)
        self.d_loss_fn = disc_loss_fn(self.lc.disc_loss)

    # ------------------------------------------------------------------ schedules
    def epoch_of(self, step: int) -> int:
        """Epoch (0-based) of optimizer step `step`; 0 when the epoch length is unknown (shards)."""
        return step // self.steps_per_epoch if self.steps_per_epoch else 0

    def perturbation(self, step: int) -> Optional[LatentPerturbation]:
        """RobustTok latent perturbation for the forward of step `step` (None when off)."""
        return robusttok_perturbation(self.quant, self.epoch_of(step))

    def disc_weight(self, step: int) -> float:
        """GAN weight ``w_disc`` at step `step` (0 before ``disc_start`` and without a discriminator)."""
        return disc_weight_at(step, self.disc_start, self.lc.disc_weight) if self.disc is not None else 0.0

    def blur(self, step: int) -> float:
        """DiffAug blur strength at step `step` (fades out after ``disc_start``; 0 without DiffAug)."""
        if self.diffaug is None:
            return 0.0
        return fade_blur_schedule(step, self.disc_start, self.lc.aug_fade_steps)

    def disc_input(self, images: Tensor, blur: float) -> Tensor:
        """Images as the discriminator sees them (DiffAug for the DINO discriminator)."""
        return self.diffaug(images, blur=blur) if self.diffaug is not None else images

    def rec_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        """Pixel reconstruction loss (``l1`` or ``l2``, mean over all elements)."""
        if self.lc.reconstruction_loss == "l1":
            return (recon - x).abs().mean()
        return F.mse_loss(recon, x)

    # ------------------------------------------------------------------ generator
    def generator(self, x: Tensor, out: TokenizerOutput, step: int) -> Tuple[Tensor, Dict[str, float]]:
        """Generator loss of `out` (the tokenizer's forward of ``x [b,3,S,S]``) at 1-based step `step`.

        Returns (the tensor to differentiate, logs). ``logs["train_loss"]`` is the loss value; the tensor may be
        a surrogate with the same gradient (the adaptive weight's one-backward form, spec §5.4).
        """
        lc = self.lc
        logs: Dict[str, float] = {}
        recon = out.recon.float()
        rec = self.rec_loss(x, recon)
        nll = lc.reconstruction_weight * rec
        logs["rec_loss"] = rec.detach().item()
        if self.lpips is not None:
            with self.autocast():
                p = self.lpips(recon, x).mean().float()
            nll = nll + lc.perceptual_weight * p
            logs["perceptual_loss"] = p.detach().item()
        q = out.loss
        rest = q["vq"] + q["commit"] + q["entropy"]  # the generator loss terms that do not go through recon
        for k in ("vq", "commit", "entropy"):
            logs[f"{k}_loss"] = float(q[k].detach())
        rest = self._add_distillation(rest, x, out, step, logs)
        loss = nll + rest
        surrogate: Optional[Tensor] = None
        w_disc = self.disc_weight(step)
        if w_disc > 0 and self.raw_disc is not None:
            self.raw_disc.requires_grad_(False)
            with self.autocast():
                logits_fake = self.raw_disc(self.disc_input(recon, self.blur(step))).float()
            self.raw_disc.requires_grad_(True)
            g_adv = self.g_loss_fn(logits_fake)
            last = self.model.last_layer
            if lc.disc_adaptive_weight and self.exact_adaptive:
                # LPIPS and discriminator backwards once each (down to recon), shared by λ and the step
                lam, g_nll, g_g = adaptive_weight_at_output(nll, g_adv, recon, last, reduce_grads=self.reduce_grads)
                surrogate = (recon * (g_nll + (lam * w_disc) * g_g)).sum() + rest
            elif lc.disc_adaptive_weight:  # fp16 loss scaling: differentiate the whole loss (scaled)
                lam = adaptive_weight(nll, g_adv, last, reduce_grads=self.reduce_grads)
            else:
                lam = torch.ones((), device=x.device)
            loss = loss + lam * w_disc * g_adv
            logs["generator_adv_loss"] = g_adv.detach().item()
            logs["disc_adaptive_weight"] = lam.item()
        logs["disc_weight"] = w_disc
        logs["train_loss"] = loss.detach().item()
        return (loss if surrogate is None else surrogate), logs

    def _add_distillation(self, total: Tensor, x: Tensor, out: TokenizerOutput, step: int,
                          logs: Dict[str, float]) -> Tensor:
        """`total` + ``weight · L_distill`` of each teacher in turn (spec §5.2-5.3); logs ``sem_loss`` /
        ``detail_loss``."""
        lc = self.lc
        for role, (teacher, loss_mod, which) in self.teachers.items():
            semantic = role == "semantic"
            feats = teacher(x)[which]
            scale = semantic_scale(self.epoch_of(step), lc.clip_norm,
                                   lc.sem_loss_scale if semantic else lc.detail_loss_scale)
            s_loss = loss_mod(out.semantic if semantic else out.detail, feats,
                              quant_conv=getattr(self.model, "quant_conv", None), n_drop=int(out.n_drop), scale=scale)
            total = total + (lc.sem_loss_weight if semantic else lc.detail_loss_weight) * s_loss
            logs["sem_loss" if semantic else "detail_loss"] = s_loss.detach().item()
        return total

    # ------------------------------------------------------------------ discriminator
    def discriminator(self, x: Tensor, fake: Tensor, step: int) -> Tuple[Tensor, Dict[str, float]]:
        """Discriminator loss on reals ``x`` and detached reconstructions `fake` (``[b,3,S,S]``) at step `step`.

        Updates the LeCam EMA with the process-mean logits first. Call only when :meth:`disc_weight` > 0.
        """
        assert self.disc is not None
        blur = self.blur(step)
        logs: Dict[str, float] = {}
        with self.autocast():
            logits_real = self.disc(self.disc_input(x, blur)).float()
            logits_fake = self.disc(self.disc_input(fake, blur)).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        logs["discriminator_adv_loss"] = d_loss.detach().item()
        if self.lecam is not None:
            # EMA of the GLOBAL batch means: identical on every rank (so the rank-0 save restores all ranks)
            self.lecam.update(*self.mean_across(logits_real.detach().float().mean(),
                                                logits_fake.detach().float().mean()))
            reg = self.lecam(logits_real, logits_fake)
            d_loss = d_loss + self.lc.lecam_loss_weight * reg
            logs["lecam_loss"] = reg.detach().item()
        logs["logits_real"] = logits_real.detach().mean().item()
        logs["logits_fake"] = logits_fake.detach().mean().item()
        return self.disc_weight(step) * d_loss, logs


__all__ = ["Teachers", "TokenizerObjective"]
