"""What the trainers train with: data sources and loaders, run length, models, frozen helpers, optimizers.

Tokenizer (spec tokenizer.md §5): :func:`data_sources`, :func:`tokenizer_loaders`, :func:`run_length`,
:func:`generator_model`, :func:`discriminator`, :func:`perceptual_loss`, :func:`teachers`,
:func:`tokenizer_optimizers`, :func:`rfid_extractor`. VAR (spec var.md §1.3): :data:`NO_WD_KEYS`,
:func:`param_groups`, :func:`build_optimizer`. Construction order matters for bit-exact runs (every builder
that draws random weights consumes the global RNG): the tokenizer trainer calls them in the order listed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from xqtool.errors import ConfigError, DataError, WeightsMissingError, XQError
from xqtool.training.objective import Teachers
from xqtool.training.schedules import per_epoch_factors, scaled_lr, warmup_cosine_factor

log = logging.getLogger(__name__)


# ============================================================================ tokenizer: data
def data_sources(cfg: Any, out: Path, acc: Any) -> Tuple[Any, Any]:
    """(train source, validation source) of ``cfg.data``; the demo photos under ``out/demo_images`` when
    ``data.data_path`` is null (written by the main process), the training source when no validation source
    is set (warned: not held out)."""
    from xqtool.data.samples import sample_photo_folder

    image_size = cfg.model.image_size
    train_src: Any = cfg.data.data_path
    val_src: Any = cfg.data.val_data_path
    if train_src is None:
        root = out / "demo_images"
        if acc.is_main_process:
            sample_photo_folder(root, image_size)
        acc.wait_for_everyone()
        train_src, default_val = sample_photo_folder(root, image_size)
        val_src = val_src or default_val
    if val_src is None:
        log.warning("data.val_data_path is not set: validating on the training source (not held out)")
        val_src = train_src
    return train_src, val_src


def tokenizer_loaders(cfg: Any, train_src: Any, val_src: Any, batch_size: int) -> Tuple[Any, Any]:
    """(train, validation) image loaders of `batch_size` per process; shuffling from ``train.global_seed``
    through their own generators (the global RNG stays untouched)."""
    from xqtool.data.images import make_loader

    image_size, seed = cfg.model.image_size, cfg.train.global_seed
    loaders = []
    for src, train in ((train_src, True), (val_src, False)):
        loader = make_loader(src, image_size=image_size, batch_size=batch_size, train=train,
                             num_workers=cfg.data.num_workers, bad_files=cfg.data.bad_files, seed=seed,
                             **({"drop_last": True} if train else {}))
        loader.generator = torch.Generator().manual_seed(seed)
        loaders.append(loader)
    return loaders[0], loaders[1]


def _num_files(source: Any) -> Optional[int]:
    try:
        from xqtool.data.sources import resolve_source

        spec = resolve_source(source)
    except XQError:
        raise
    except Exception:  # pragma: no cover
        return None
    return len(spec.items) if spec.kind == "files" else None


@dataclass
class RunLength:
    """Step counts of a tokenizer run: epoch length (None for shards of unknown size), optimizer steps, the
    first GAN step and the warm-up steps."""

    steps_per_epoch: Optional[int]
    total_steps: int
    disc_start: int
    warmup: int


def run_length(cfg: Any, train_src: Any, max_steps: Optional[int]) -> RunLength:
    """:class:`RunLength` from ``train``/``loss`` settings and the number of training images.

    Raises DataError when the source has fewer images than one global batch, ConfigError when a length needs
    the epoch size of shards (``train.max_steps``/``loss.disc_epoch_start`` without a count).
    """
    tc, lc = cfg.train, cfg.loss
    n_files = _num_files(train_src)
    steps_per_epoch: Optional[int] = None
    if n_files is not None:
        steps_per_epoch = max(1, n_files // tc.global_batch_size)
        if n_files < tc.global_batch_size:
            raise DataError(
                f"the training source has {n_files} images, fewer than train.global_batch_size={tc.global_batch_size}"
            )
    max_steps = max_steps or tc.max_steps
    if not max_steps:
        if steps_per_epoch is None:
            raise ConfigError("the number of images in shards is unknown: pass --max-steps N (config key train.max_steps)")
        max_steps = tc.epochs * steps_per_epoch
    if lc.disc_start >= 0:
        disc_start = lc.disc_start
    elif steps_per_epoch is not None:
        disc_start = lc.disc_epoch_start * steps_per_epoch
    else:
        raise ConfigError("loss.disc_epoch_start needs a known epoch length: set loss.disc_start (steps) for shards")
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else (steps_per_epoch or 0)
    return RunLength(steps_per_epoch, int(max_steps), disc_start, int(warmup))


# ============================================================================ tokenizer: models
def check_weights_available(cfg: Any, allow_random: bool) -> None:
    """Fail before anything heavy when a needed pretrained teacher is not available offline (ConfigError for
    detail guidance without patch tokens, WeightsMissingError for missing teacher weights)."""
    lc = cfg.loss
    if lc.detail_guide != "none" and lc.guide_type_2 != "patch":
        raise ConfigError(
            f"loss.detail_guide={lc.detail_guide} needs loss.guide_type_2=patch: the reference runs detail guidance "
            f"only on the CLIP patch tokens (spec §5.3); pass --set loss.guide_type_2=patch"
        )
    from xqtool.models.teachers import teacher_spec, teacher_weights_available

    for kind, weights, key in _teacher_roles(cfg, with_keys=True):
        if allow_random or teacher_weights_available(kind, weights):
            continue
        spec = teacher_spec(kind)
        raise WeightsMissingError(
            f"{spec.label} teacher weights for {key.split('.')[1].split('_')[0]} guidance not found: pass "
            f"--set {key}=PATH or set {spec.env_var}=PATH (a timm .pth/.safetensors of {spec.model_name}), "
            f"or disable it with --set loss.{'semantic_guide' if 'semantic' in key else 'detail_guide'}=none"
        )


def _teacher_roles(cfg: Any, with_keys: bool = False) -> List[Tuple[str, ...]]:
    """Enabled teachers: (kind, weights, config key) or (role, kind, weights, guide type)."""
    lc = cfg.loss
    detail_kind = "clip" if lc.detail_guide in ("sam", "clip") else "none"
    roles = [("semantic", lc.semantic_guide, lc.semantic_weights, lc.guide_type_1, "loss.semantic_weights"),
             ("detail", detail_kind, lc.detail_weights, lc.guide_type_2, "loss.detail_weights")]
    if with_keys:
        return [(kind, weights, key) for _, kind, weights, _, key in roles if kind != "none"]
    return [(role, kind, weights, guide) for role, kind, weights, guide, _ in roles if kind != "none"]


def generator_model(cfg: Any, tokenizer: Optional[nn.Module]) -> nn.Module:
    """The tokenizer to train, in training mode: `tokenizer` as given (already loaded / tuned), else a random
    one with the DINOv2 backbones of ``model.encoder_weights``/``decoder_weights``."""
    from xqtool.models.tokenizer import build_tokenizer

    if tokenizer is None:
        tok = build_tokenizer(cfg)
        _load_pretrained_backbones(cfg, tok)
    else:
        tok = tokenizer
    return tok.train()


def _load_pretrained_backbones(cfg: Any, tok: nn.Module) -> None:
    """Start ViT encoder/decoder from DINOv2 weights when ``model.encoder_weights``/``decoder_weights`` are set."""
    m = cfg.model
    if m.enc_type != "dinov2":
        return
    from xqtool.checkpoints.pretrained import load_vit_tokenizer_weights

    for part, source, key in ((tok.encoder, m.encoder_weights, "model.encoder_weights"),
                              (tok.decoder, m.decoder_weights, "model.decoder_weights")):
        if source:
            used = load_vit_tokenizer_weights(part, source, config_key=key)
            log.info("loaded %s from %s", key, used)


def discriminator(cfg: Any, allow_random: bool, overrides: Optional[Dict[str, Any]]) -> Optional[nn.Module]:
    """The GAN discriminator of ``loss.disc_type``; None without a GAN (``none`` or ``disc_weight`` 0)."""
    lc = cfg.loss
    if lc.disc_type == "none" or lc.disc_weight <= 0:
        return None
    from xqtool.models.discriminators import build_discriminator

    return build_discriminator(lc.disc_type, cfg.model.image_size, disc_weights=lc.disc_weights,
                               allow_random=allow_random, overrides=overrides)


def perceptual_loss(cfg: Any, allow_random: bool, device: torch.device) -> Optional[nn.Module]:
    """LPIPS-VGG16 on `device` when ``loss.perceptual_weight`` > 0, else None."""
    if cfg.loss.perceptual_weight <= 0:
        return None
    from xqtool.losses.lpips import LPIPS

    return LPIPS(weights=cfg.loss.lpips_weights, allow_random=allow_random).to(device)


def teachers(cfg: Any, tok: nn.Module, device: torch.device, overrides: Dict[str, Any],
             allow_random: bool) -> Tuple[nn.ModuleDict, Teachers]:
    """Frozen teachers per role and the trainable loss-side projections (``aux``, outside model and EMA).

    A teacher's patch size is ``overrides["patch_size"]`` or 16 (``max(1, S/4)`` for images under 64 px).
    """
    from xqtool.losses import SemanticDistillLoss
    from xqtool.models.teachers import SemanticTeacher

    lc, image_size, D = cfg.loss, cfg.model.image_size, cfg.quant.codebook_embed_dim
    aux = nn.ModuleDict()
    found: Teachers = {}
    for role, kind, weights, guide in _teacher_roles(cfg):
        ov = dict(overrides)
        patch = int(ov.pop("patch_size", 16 if image_size >= 64 else max(1, image_size // 4)))
        teacher = SemanticTeacher(kind, image_size=image_size, patch_size=patch, weights=weights,
                                  allow_random=allow_random, **ov).to(device)
        E = teacher.embed_dim
        own = SemanticDistillLoss.needs_own_projection(getattr(tok, "quant_conv", None), E, D)
        loss_mod = SemanticDistillLoss(E, D, own_projection=own, normalize=lc.clip_norm)
        aux[role] = loss_mod
        found[role] = (teacher, loss_mod, "patches" if guide == "patch" else "cls")
    return aux, found


# ============================================================================ tokenizer: optimizers
@dataclass
class Optimizers:
    """AdamW and LambdaLR of the generator (tokenizer + aux) and of the discriminator (None without one)."""

    opt_g: torch.optim.Optimizer
    sched_g: Any
    opt_d: Optional[torch.optim.Optimizer]
    sched_d: Any


def tokenizer_optimizers(cfg: Any, tok: nn.Module, aux: nn.Module, disc: Optional[nn.Module], length: RunLength,
                         device: torch.device) -> Optimizers:
    """Optimizers over parameters that require grad (built AFTER any tuning method was applied) and their lr
    schedules (spec §5.6: per step, or the reference's per epoch with ``train.lr_schedule=epoch``).

    The discriminator's scheduler counts discriminator steps, which begin at ``length.disc_start``.
    Raises ConfigError when nothing is trainable.
    """
    from xqtool.runtime import fast_adamw_kwargs

    tc = cfg.train
    gen_params = [p for p in tok.parameters() if p.requires_grad] + [p for p in aux.parameters()]
    if not gen_params:
        raise ConfigError("no trainable tokenizer parameters (everything is frozen)")
    g_lr = scaled_lr(tc.lr, tc.global_batch_size, tc.lr_scale_rule)
    d_lr = scaled_lr(tc.disc_lr, tc.global_batch_size, tc.lr_scale_rule)
    fast = fast_adamw_kwargs(device)  # fused AdamW kernel where torch has one (CPU and CUDA)
    total, warm, dstart = length.total_steps, length.warmup, length.disc_start
    per_epoch = _per_epoch_lr(tc, length, g_lr, d_lr)
    opt_g = torch.optim.AdamW(gen_params, lr=g_lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay, **fast)
    sched_g = torch.optim.lr_scheduler.LambdaLR(
        opt_g, per_epoch[0] if per_epoch else
        (lambda s: warmup_cosine_factor(s, total=total, warmup=warm, kind=tc.lr_scheduler, base=g_lr,
                                        min_lr=tc.min_lr))
    )
    if disc is None:
        return Optimizers(opt_g, sched_g, None, None)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=d_lr, betas=(tc.beta1, tc.beta2),
                              weight_decay=tc.disc_weight_decay, **fast)
    d_warm = max(1, int(0.02 * max(1, total - dstart)))
    sched_d = torch.optim.lr_scheduler.LambdaLR(
        opt_d, per_epoch[1] if per_epoch else
        (lambda s: warmup_cosine_factor(s, total=max(1, total - dstart), warmup=d_warm, kind=tc.lr_scheduler,
                                        base=d_lr, min_lr=tc.min_lr))
    )
    return Optimizers(opt_g, sched_g, opt_d, sched_d)


def _per_epoch_lr(tc: Any, length: RunLength, g_lr: float, d_lr: float) -> Optional[Tuple[Any, Any]]:
    """LambdaLR factors of the reference's per-epoch schedules (spec §5.6), None for the per-step ones."""
    if tc.lr_schedule != "epoch":
        return None
    if not length.steps_per_epoch:
        log.warning("train.lr_schedule=epoch needs a known epoch length (shards without a count): "
                    "using the per-step schedule")
        return None
    return per_epoch_factors(tc, length.steps_per_epoch, g_lr, d_lr, length.disc_start)


def rfid_extractor(cfg: Any) -> Optional[Callable[[Tensor], Tensor]]:
    """clean-fid Inception for validation rFID when its weights are available offline; None (rFID skipped)
    otherwise. Raises WeightsMissingError when ``train.best_metric=rfid`` needs it."""
    from xqtool.metrics import inception_extractor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return inception_extractor(cfg.train.inception_weights, device=device)
    except WeightsMissingError:
        if cfg.train.best_metric == "rfid":
            raise WeightsMissingError(
                "train.best_metric=rfid needs the clean-fid Inception weights (inception-2015-12-05.pt) offline: "
                "--set train.inception_weights=PATH (or $XQTOOL_INCEPTION_WEIGHTS), or --set train.best_metric=psnr"
            ) from None
        log.warning("Inception weights not found: rFID is skipped (--set train.inception_weights=PATH to enable it)")
        return None


# ============================================================================ VAR
NO_WD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
              "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decayed weights, and (wd_sc 0) 1-D params, biases and the spec's named tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_WD_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "wd_sc": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_sc": 0.0}]


def build_optimizer(model: torch.nn.Module, t: Any, device: torch.device, lr: Optional[float] = None
                    ) -> torch.optim.AdamW:
    """VAR's AdamW over :func:`param_groups` (betas ``t.beta1``, ``t.beta2``; weight decay ``t.weight_decay``).

    Uses torch's fused AdamW kernel where it exists for `device` (CUDA, and the CPU since torch 2.4): one
    pass over all parameters instead of a dozen elementwise ops per tensor; the same update to float
    rounding (``tests/test_train_step_speed.py``). Falls back to the multi-tensor (foreach) kind elsewhere.
    """
    from xqtool.runtime import fast_adamw_kwargs

    kw: Dict[str, Any] = {"lr": t.tblr if lr is None else lr, "betas": (t.beta1, t.beta2)}
    kw.update(fast_adamw_kwargs(device))
    return torch.optim.AdamW(param_groups(model, t.weight_decay), **kw)


__all__ = ["NO_WD_KEYS", "Optimizers", "RunLength", "build_optimizer", "check_weights_available", "data_sources",
           "discriminator", "generator_model", "param_groups", "perceptual_loss", "rfid_extractor", "run_length",
           "teachers", "tokenizer_loaders", "tokenizer_optimizers"]
