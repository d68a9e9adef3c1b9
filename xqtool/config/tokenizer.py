"""The tokenizer schema: five sections, the official keys xqtool ignores, validation, hash (spec tokenizer.md).

A tokenizer config has five sections (``model``, ``quant``, ``loss``, ``data``, ``train``). YAML files
may be nested by section (xqtool style) or flat with the official XQ-GAN key names (every official
key lives in exactly one section, so a user's existing XQ-GAN YAML loads unchanged). Every bound on a
value is checked here, once, by :func:`validate_tokenizer_config` before any model is built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from xqtool.config.loader import check_config_ranges, choices, config_to_dict, flat_index, load_yaml_dataclass
from xqtool.errors import ConfigError
from xqtool.validate import FRACTION, NON_NEGATIVE, POSITIVE, Range

# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Encoder/decoder architecture (spec §2)."""

    image_size: int = 256
    enc_type: str = field(default="dinov2", metadata=choices("cnn", "dinov2"))
    dec_type: str = field(default="dinov2", metadata=choices("cnn", "dinov2"))
    encoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    decoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    vq_model: str = field(default="VQ-16", metadata=choices("VQ-16", "VQ-8"))
    ch: int = 128
    ch_mult: Optional[Tuple[int, ...]] = None
    z_channels: int = 256
    num_res_blocks: int = 2
    dropout_p: float = 0.0
    num_latent_tokens: int = 256
    abs_pos_embed: bool = True
    vit_patch_size: int = 16
    vit_embed_dim: Optional[int] = None
    vit_depth: Optional[int] = None
    vit_num_heads: Optional[int] = None
    drop_path_rate: float = 0.1
    encoder_weights: Optional[str] = None
    decoder_weights: Optional[str] = None
    enc_tuning_method: str = field(default="full", metadata=choices("full", "lora", "frozen"))
    dec_tuning_method: str = field(default="full", metadata=choices("full", "lora", "frozen"))
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    lora_targets: str = r".*\.mlp\.fc\d"


@dataclass
class QuantConfig:
    """Product / multi-scale quantizer (spec §3)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    codebook_weight: float = 1.0
    v_patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    product_quant: int = 1
    codebook_drop: float = 0.0
    start_drop: int = 1
    share_quant_resi: int = 4
    lfq: bool = False
    scale: float = 1.0
    soft_entropy: bool = True
    # RobustTok latent perturbation (spec §3.6); zero alpha/beta = disabled.
    alpha: float = 0.0
    beta: float = 0.0
    delta: int = 100
    anneal_start: int = 200
    anneal_end: int = 200
    end_ratio: float = 0.5


@dataclass
class LossConfig:
    """Generator and discriminator objectives (spec §5)."""

    reconstruction_loss: str = field(default="l2", metadata=choices("l1", "l2"))
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_weights: Optional[str] = None
    disc_type: str = field(default="dinodisc", metadata=choices("patchgan", "stylegan", "dinodisc", "none"))
    disc_loss: str = field(default="hinge", metadata=choices("hinge", "vanilla", "non_saturating"))
    gen_loss: str = field(default="hinge", metadata=choices("hinge", "vanilla", "non_saturating"))
    disc_weight: float = 0.5
    disc_start: int = -1
    disc_epoch_start: int = 0
    disc_adaptive_weight: bool = True
    disc_weights: Optional[str] = None
    disc_reinit: int = 0
    norm_type: str = field(default="bn", metadata=choices("bn", "gn", "none"))
    lecam_loss_weight: float = 0.0
    aug_prob: float = 1.0
    aug_fade_steps: int = 0
    semantic_guide: str = field(default="dinov2", metadata=choices("dinov2", "clip", "none"))
    semantic_weights: Optional[str] = None
    detail_guide: str = field(default="none", metadata=choices("none", "sam", "clip"))
    detail_weights: Optional[str] = None
    sem_loss_weight: float = 0.1
    detail_loss_weight: float = 0.1
    dependency_loss_weight: float = 0.0
    clip_norm: bool = False
    sem_loss_scale: float = 1.0
    detail_loss_scale: float = 1.0
    guide_type_1: str = field(default="class", metadata=choices("class", "patch"))
    guide_type_2: str = field(default="class", metadata=choices("class", "patch"))
    half_sem: bool = False


@dataclass
class DataConfig:
    """Where images come from (folders, file lists, WebDataset shards) and how bad files are handled."""

    data_path: Optional[str] = None
    val_data_path: Optional[str] = None
    dataset: str = "imagenet"
    num_workers: int = 4
    bad_files: str = field(default="skip", metadata=choices("skip", "fail"))
    max_val_images: int = 0


@dataclass
class TrainConfig:
    """Optimisation, schedules, checkpoints and logging (spec §5.6–5.8)."""

    global_batch_size: int = 1024
    epochs: int = 200
    max_steps: int = 0
    lr: float = 1e-4
    lr_scale_rule: str = field(default="batch/128", metadata=choices("batch/128", "none"))
    lr_scheduler: str = field(default="cosine", metadata=choices("cosine", "constant", "none"))
    # "epoch": the reference's timm schedule stepped once per epoch (spec §5.6, xqtool/training/schedules.py);
    # "step": xqtool's per-step schedule (linear warm-up over warmup_steps from ~0, then per-step cosine).
    lr_schedule: str = field(default="epoch", metadata=choices("epoch", "step"))
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    disc_warmup_epochs: int = -1  # -1: floor(0.02 * epochs), as the reference
    warmup_steps: int = -1
    min_lr: float = 5e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    disc_lr: float = 1e-4
    disc_weight_decay: float = 5e-4
    max_grad_norm: float = 0.0
    mixed_precision: str = field(default="bf16", metadata=choices("no", "fp16", "bf16"))
    grad_accum: int = 1
    ema: bool = True
    ema_decay: float = 0.9999
    # checkpoints, evaluation, logging (vis_every, cloud_save_path, vq_ckpt, no_local_save: see IGNORED_KEYS)
    ckpt_every: int = 10000
    eval_every: int = 10000
    log_every: int = 100
    vis_every: int = 5000
    results_dir: str = "results_tokenizer_image"
    cloud_save_path: Optional[str] = None
    save_best: bool = True
    best_metric: str = field(default="rfid", metadata=choices("rfid", "psnr", "ssim"))
    global_seed: int = 0
    tracker: str = field(default="tensorboard", metadata=choices("tensorboard", "wandb", "none"))
    nan_patience: int = 5
    allow_batch_change: bool = False
    vq_ckpt: Optional[str] = None
    finetune: bool = False
    no_local_save: bool = False
    inception_weights: Optional[str] = None


@dataclass
class TokenizerConfig:
    """Everything needed to build and train an XQ-GAN tokenizer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def scales(self) -> Tuple[int, ...]:
        return tuple(self.quant.v_patch_nums)

    @property
    def tokens_per_branch(self) -> int:
        return sum(p * p for p in self.quant.v_patch_nums)


# --------------------------------------------------------------------------------------------------
# Official keys xqtool accepts but does not act on (the one list)
# --------------------------------------------------------------------------------------------------

#: ``default`` of an ignored key that no value could change (no warning, whatever the value).
ANY_VALUE = object()


@dataclass(frozen=True)
class IgnoredKey:
    """An official XQ-GAN key that xqtool accepts and does not act on.

    ``section`` is the config section that stores it (it round-trips through saved configs), or None for a
    switch of the reference's launch scripts that is dropped while loading. A stored key whose value differs
    from ``default`` is reported by :func:`ignored_settings` (one line) when training starts.
    """

    key: str
    section: Optional[str]
    default: Any
    why: str


IGNORED_KEYS: Tuple[IgnoredKey, ...] = (
    IgnoredKey("codebook_weight", "quant", 1.0, "declared but unused by the reference's loss as well (spec §1.3)"),
    IgnoredKey("codebook_show_usage", "quant", True, "codebook usage is always logged"),
    IgnoredKey("norm_type", "loss", "bn",
               "the DINO discriminator heads always use BatchNormLocal (norm_type bn, spec §5.4)"),
    IgnoredKey("disc_reinit", "loss", 0, "the discriminator is never re-initialised"),
    IgnoredKey("dependency_loss_weight", "loss", 0.0,
               "the branch dependency loss is not implemented (disabled in every released config)"),
    IgnoredKey("half_sem", "loss", ANY_VALUE,
               "it only decides whether the reference creates its unused sem_linear layer (spec §2.4, §2.6)"),
    IgnoredKey("vis_every", "train", 5000, "reconstruction grids are written at every evaluation (train.eval_every)"),
    IgnoredKey("vq_ckpt", "train", None,
               "start from a checkpoint with `xqtool finetune --from CKPT` or resume with --resume"),
    IgnoredKey("no_local_save", "train", False, "checkpoints are always written under the output directory"),
    IgnoredKey("cloud_save_path", "train", ANY_VALUE, "checkpoints are written under the output directory (-o)"),
    IgnoredKey("dataset", "data", "imagenet", "the kind of image source is read from data.data_path"),
    *(IgnoredKey(key, None, ANY_VALUE, "a switch of the reference's launch scripts")
      for key in ("gpu", "no_wandb", "test_model", "compile", "vis_img", "wandb_project", "exp_index",
                  "dataset_path")),
)


def ignored_settings(cfg: TokenizerConfig) -> List[str]:
    """One line per stored official key set to a value xqtool does not act on (empty when all are default).

    Also one line when RobustTok's ``alpha``/``beta`` are set with several scales (the perturbation is single-scale).
    """
    out = []
    q = cfg.quant
    if q.alpha > 0 and q.beta > 0 and len(q.v_patch_nums) > 1:
        out.append(f"quant.alpha={q.alpha!r}/quant.beta={q.beta!r} has no effect in xqtool with several scales "
                   "(the RobustTok latent perturbation needs a single-scale quantizer, spec §3.6); ignored")
    for entry in IGNORED_KEYS:
        if entry.section is None or entry.default is ANY_VALUE:
            continue
        value = getattr(getattr(cfg, entry.section), entry.key)
        if value != entry.default:
            out.append(f"{entry.section}.{entry.key}={value!r} has no effect in xqtool ({entry.why}); ignored")
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer config: load, validate, hash
# --------------------------------------------------------------------------------------------------

#: Numeric bounds of single values (dotted key -> rule); combinations are checked in code below.
TOKENIZER_RANGES: Dict[str, Range] = {
    "train.lr": Range(lo=0, lo_open=True),
    "train.min_lr": NON_NEGATIVE,
    "train.disc_lr": Range(lo=0, lo_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.disc_weight_decay": NON_NEGATIVE,
    "train.beta1": Range(lo=0, hi=1, hi_open=True),
    "train.beta2": Range(lo=0, hi=1, hi_open=True),
    "train.max_grad_norm": NON_NEGATIVE,
    "train.epochs": POSITIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.warmup_steps": Range(lo=-1, hint="-1 = default"),
    "train.ckpt_every": NON_NEGATIVE,
    "train.eval_every": NON_NEGATIVE,
    "train.log_every": NON_NEGATIVE,
    "train.vis_every": NON_NEGATIVE,
    "train.global_seed": NON_NEGATIVE,
    "train.nan_patience": NON_NEGATIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.max_val_images": NON_NEGATIVE,
    "loss.reconstruction_weight": NON_NEGATIVE,
    "loss.perceptual_weight": NON_NEGATIVE,
    "loss.disc_weight": NON_NEGATIVE,
    "loss.lecam_loss_weight": NON_NEGATIVE,
    "loss.aug_prob": FRACTION,
    "loss.sem_loss_weight": NON_NEGATIVE,
    "loss.detail_loss_weight": NON_NEGATIVE,
    "loss.dependency_loss_weight": NON_NEGATIVE,
    "model.dropout_p": Range(lo=0, hi=1, hi_open=True),
}

# Fields that do not change which tokens a tokenizer produces (excluded from the config hash).
_NON_ARCH_FIELDS = {
    "model": {"drop_path_rate", "dropout_p", "encoder_weights", "decoder_weights", "enc_tuning_method",
              "dec_tuning_method", "lora_rank", "lora_alpha", "lora_targets"},
    "quant": {"codebook_show_usage", "commit_loss_beta", "entropy_loss_ratio", "codebook_weight", "codebook_drop",
              "start_drop", "soft_entropy", "alpha", "beta", "delta", "anneal_start", "anneal_end", "end_ratio"},
}


def cnn_ch_mult(cfg: ModelConfig) -> Tuple[int, ...]:
    """Channel multipliers of the CNN encoder/decoder (explicit `ch_mult`, else from `vq_model`)."""
    if cfg.ch_mult:
        return tuple(cfg.ch_mult)
    return (1, 1, 2, 2, 4) if cfg.vq_model == "VQ-16" else (1, 2, 2, 4)


def validate_tokenizer_config(cfg: TokenizerConfig) -> TokenizerConfig:
    """Check every bound and combination once, before any model is built; return `cfg`.

    Raises:
        ConfigError: one line naming the key and what to change (quant, then model, then loss/train
            combinations, then the single-value ranges of :data:`TOKENIZER_RANGES`).
    """
    _check_quant(cfg.quant)
    _check_model(cfg.model, side=cfg.quant.v_patch_nums[-1])
    if cfg.loss.detail_guide != "none" and cfg.quant.product_quant < 2:
        raise ConfigError("loss.detail_guide needs product_quant >= 2 (detail branch 0, semantic branch last)")
    t = cfg.train
    if t.global_batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.global_batch_size and train.grad_accum must be positive")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    check_config_ranges(cfg, TOKENIZER_RANGES)
    return cfg


def _check_quant(q: QuantConfig) -> None:
    """Scales, codebook geometry, LFQ/BSQ, quantizer dropout (spec §3.4: codebook_drop in [0, 1), a dropout
    sample keeps start_drop..S scales with start_drop >= 1)."""
    scales = tuple(q.v_patch_nums)
    if not scales:
        raise ConfigError("quant.v_patch_nums is empty: give at least one scale, e.g. [1, 2, 4, 8]")
    if any(p < 1 for p in scales):
        raise ConfigError(f"quant.v_patch_nums must be positive, got {list(scales)}")
    if any(b < a for a, b in zip(scales, scales[1:])):
        raise ConfigError(f"quant.v_patch_nums must be non-decreasing (coarse to fine), got {list(scales)}")
    if q.codebook_size < 2:
        raise ConfigError(f"quant.codebook_size must be at least 2, got {q.codebook_size}")
    if q.codebook_embed_dim < 1:
        raise ConfigError(f"quant.codebook_embed_dim must be positive, got {q.codebook_embed_dim}")
    if q.product_quant < 1:
        raise ConfigError(f"quant.product_quant must be at least 1, got {q.product_quant}")
    if q.lfq:
        if q.codebook_embed_dim > 30:
            raise ConfigError(f"LFQ/BSQ codebook_embed_dim {q.codebook_embed_dim} too large (2**D codes); use D <= 30")
        if q.codebook_size != 2 ** q.codebook_embed_dim:
            raise ConfigError(
                f"LFQ/BSQ needs codebook_size = 2**codebook_embed_dim, got {q.codebook_size} vs "
                f"2**{q.codebook_embed_dim} = {2 ** q.codebook_embed_dim}: set codebook_embed_dim to "
                f"{max(1, q.codebook_size.bit_length() - 1)} or codebook_size to {2 ** q.codebook_embed_dim}"
            )
        if len(scales) == 1:
            raise ConfigError("lfq: true needs a multi-scale v_patch_nums (e.g. [1,1,2,3,3,4,5,6,8,11]) or lfq: false")
    if not 0.0 <= q.codebook_drop < 1.0:
        raise ConfigError(f"quant.codebook_drop must be in [0, 1), got {q.codebook_drop}")
    if q.codebook_drop > 0 and len(scales) > 1 and not 1 <= q.start_drop <= len(scales):
        raise ConfigError(
            f"quant.start_drop={q.start_drop} is outside 1..{len(scales)} (the number of scales): "
            f"quantizer dropout keeps between start_drop and {len(scales)} scales"
        )
    if q.share_quant_resi < 0:
        raise ConfigError(f"quant.share_quant_resi must be >= 0, got {q.share_quant_resi}")


def _check_model(m: ModelConfig, side: int) -> None:
    """Encoder/decoder geometry against the latent side (the last scale), tuning methods, ViT sizes."""
    if m.image_size < 8:
        raise ConfigError(f"model.image_size must be at least 8, got {m.image_size}")
    if m.enc_type == "dinov2" or m.dec_type == "dinov2":
        if m.image_size % m.vit_patch_size:
            raise ConfigError(
                f"model.image_size={m.image_size} is not divisible by model.vit_patch_size={m.vit_patch_size}"
            )
    if m.enc_type == "dinov2":
        if m.num_latent_tokens != side * side:
            raise ConfigError(
                f"model.num_latent_tokens={m.num_latent_tokens} must equal the last scale squared "
                f"({side}² = {side * side}): set num_latent_tokens: {side * side} or end v_patch_nums with "
                f"{int(round(m.num_latent_tokens ** 0.5))}"
            )
    else:
        levels = len(cnn_ch_mult(m)) - 1
        if m.image_size % (2 ** levels):
            raise ConfigError(
                f"model.image_size={m.image_size} is not divisible by the CNN downsampling 2**{levels}"
            )
        cnn_side = m.image_size // (2 ** levels)
        if cnn_side != side:
            raise ConfigError(
                f"the CNN encoder ({m.vq_model if not m.ch_mult else 'ch_mult ' + str(list(m.ch_mult))}) produces a "
                f"{cnn_side}x{cnn_side} latent at image_size {m.image_size}, but v_patch_nums ends with {side}: "
                f"end v_patch_nums with {cnn_side} or change image_size/ch_mult"
            )
        if m.num_latent_tokens != side * side:
            raise ConfigError(
                f"model.num_latent_tokens={m.num_latent_tokens} must equal the CNN latent size {side}² = {side * side}"
            )
        if m.ch < 1 or m.z_channels < 1:
            raise ConfigError("model.ch and model.z_channels must be positive")
    if m.dec_type == "cnn" and m.enc_type == "dinov2" or m.dec_type == "dinov2" and m.enc_type == "cnn":
        raise ConfigError(
            f"enc_type={m.enc_type} with dec_type={m.dec_type} is not supported: use the same type for both"
        )
    for name, method in (("enc_tuning_method", m.enc_tuning_method), ("dec_tuning_method", m.dec_tuning_method)):
        if method == "lora" and (m.enc_type if name.startswith("enc") else m.dec_type) == "cnn":
            raise ConfigError(f"model.{name}=lora needs a ViT (dinov2) backbone; use full or frozen with a CNN")
    if m.vit_embed_dim is not None and m.vit_num_heads is not None and m.vit_embed_dim % m.vit_num_heads:
        raise ConfigError(
            f"model.vit_embed_dim={m.vit_embed_dim} is not divisible by model.vit_num_heads={m.vit_num_heads}"
        )


def load_tokenizer_config(
    source: Union[str, Path, Mapping[str, Any], None] = None,
    overrides: Optional[Iterable[str]] = None,
) -> TokenizerConfig:
    """Load a tokenizer config from YAML (xqtool nested or official flat keys) plus ``key=value`` overrides.

    The launcher switches of :data:`IGNORED_KEYS` are dropped; the result is validated
    (:func:`validate_tokenizer_config`). Raises ConfigError (unknown key, wrong type, bound, combination).
    """
    dropped = [entry.key for entry in IGNORED_KEYS if entry.section is None]
    cfg = load_yaml_dataclass(source, TokenizerConfig, overrides, ignored_keys=dropped)
    return validate_tokenizer_config(cfg)


def tokenizer_config_from_args(args: Mapping[str, Any]) -> TokenizerConfig:
    """Validated config from an official checkpoint's ``args`` (argparse Namespace as a dict); keys that are
    not config fields are dropped. ConfigError when the kept values are invalid."""
    index = flat_index(TokenizerConfig)
    known = {k: v for k, v in args.items() if k in index}
    return load_tokenizer_config(known)


def config_hash(cfg: TokenizerConfig) -> str:
    """12-hex fingerprint of the fields that decide which tokens a tokenizer produces (model + quant)."""
    return arch_hash(cfg.model, cfg.quant)


def arch_hash(model: ModelConfig, quant: QuantConfig) -> str:
    """:func:`config_hash` from the two sections alone (what a built tokenizer keeps)."""
    tree = {"model": config_to_dict(model), "quant": config_to_dict(quant)}
    arch = {
        section: {k: v for k, v in values.items() if k not in _NON_ARCH_FIELDS[section]}
        for section, values in tree.items()
    }
    blob = json.dumps(arch, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
