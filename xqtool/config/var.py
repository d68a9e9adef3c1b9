"""The VAR generator schema: dataclasses, presets, bounds and YAML loading (spec var.md §1, §2).

A VAR config has three sections:

- ``model``  (:class:`VARModelConfig`): the transformer. Width, heads and drop-path follow the depth rule
  (width = 64·depth, heads = depth, drop-path = 0.1·depth/24) unless set explicitly (tiny test models).
- ``data``   (:class:`VARDataConfig`): token files/shards written by ``xqtool encode`` or an image source
  encoded on the fly, plus the frozen tokenizer checkpoint.
- ``train``  (:class:`VARTrainConfig`): optimisation (upstream flag names in the comments).

YAML files accept nested sections or flat keys; unknown keys are rejected with a did-you-mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

from xqtool.config.loader import check_config_ranges, choices, load_yaml_dataclass
from xqtool.errors import ConfigError
from xqtool.validate import FRACTION, NON_NEGATIVE, POSITIVE, Range

MSVR_PATCH_NUMS: Tuple[int, ...] = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
VAR_PATCH_NUMS: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

PRESET_DEPTHS = {"d16": 16, "d17": 17, "d20": 20, "d24": 24, "d30": 30}


@dataclass
class VARModelConfig:
    """Architecture of the VAR transformer (everything that decides the state_dict layout)."""

    depth: int = 16                                   # `depth`
    width: Optional[int] = None                       # None → 64·depth
    num_heads: Optional[int] = None                   # None → depth
    mlp_ratio: float = 4.0
    drop_path_rate: Optional[float] = None            # None → 0.1·depth/24
    num_classes: int = 1000
    patch_nums: Tuple[int, ...] = MSVR_PATCH_NUMS     # `pn` (scales, coarse → fine)
    codebook_size: int = 4096                         # per branch (K); head width V = P·K
    num_branches: int = 2                             # product-quantisation branches P
    branch_dim: int = 32                              # code dimension per branch; word_embed input = P·branch_dim
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    shared_aln: bool = False                          # `saln`
    attn_l2_norm: bool = True                         # `anorm`
    init_std: float = -1.0                            # `ini` (<0 → sqrt(1/(3C)))
    init_head: float = 0.02                           # `hd`
    init_adaln: float = 0.5                           # `aln`
    init_adaln_gamma: float = 1e-5                    # `alng`
    p_drop: float = 0.0                               # ImageFolder MLM token drop (adds `empty_emb`)

    @property
    def embed_dim(self) -> int:
        """Transformer width C."""
        return self.width if self.width is not None else 64 * self.depth

    @property
    def heads(self) -> int:
        """Number of attention heads H."""
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def dpr(self) -> float:
        """Maximum drop-path rate (reached by the last block)."""
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    @property
    def seq_len(self) -> int:
        """L = Σ pn²."""
        return sum(p * p for p in self.patch_nums)

    @property
    def vocab_size(self) -> int:
        """V = P·K (head output width)."""
        return self.num_branches * self.codebook_size

    @property
    def cvae(self) -> int:
        """word_embed input width P·D."""
        return self.num_branches * self.branch_dim


@dataclass
class VARDataConfig:
    """Training data: token files/shards (fast) or images encoded on the fly by the frozen tokenizer."""

    tokens: Optional[str] = None          # .npy token file, directory of them, or WebDataset token shards
    images: Optional[str] = None          # image source (class tree, flat dir, list, shards) if no tokens
    tokenizer: Optional[str] = None       # tokenizer checkpoint (xqtool dir or official .pt)
    image_size: Optional[int] = None      # None → the tokenizer's image size
    hflip: bool = False                   # random horizontal flip of on-the-fly images (`hflip`, off upstream)
    val_tokens: Optional[str] = None      # held-out tokens (from `xqtool encode`) for the validation pass
    num_workers: int = 0
    bad_files: str = field(default="skip", metadata=choices("skip", "fail"))


@dataclass
class VARTrainConfig:
    """Optimisation and bookkeeping (upstream flag in the comment)."""

    global_batch_size: int = 768          # `bs`
    epochs: int = 350                     # `ep`
    max_steps: int = 0                    # 0 → epochs × steps per epoch
    tblr: float = 8e-5                    # base LR per 256 images; lr = tblr · global_batch / 256
    weight_decay: float = 0.05            # `twd`
    weight_decay_end: float = 0.0         # `twde` (0 → constant)
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 2.0            # `tclip` (<= 0 disables)
    label_smoothing: float = 0.0          # `ls`
    warmup_epochs: Optional[float] = None  # `wp` (None → epochs/50)
    warmup_steps: Optional[int] = None    # overrides warmup_epochs when set
    warmup_start: float = 0.005           # `wp0`
    final_lr_ratio: float = 0.01          # `wpe`
    schedule: str = field(default="lin0", metadata=choices("lin0", "lin", "lin00", "cos", "constant"))
    mixed_precision: str = field(default="bf16", metadata=choices("no", "fp16", "bf16"))
    grad_accum: int = 1                   # `ac`
    val_every_epochs: int = 10            # validation on data.val_tokens every N epochs and at the end (§3)
    val_batch_size: int = 0               # 0 → round(1.5 · per-process batch), as upstream
    ckpt_every: int = 1000
    keep_last: int = 2
    nan_patience: int = 5                 # consecutive non-finite steps (skipped) before the run stops
    allow_batch_change: bool = False     # resume with another global batch / process count (remapped)
    log_every: int = 20
    results_dir: str = "runs/var"
    seed: int = 0
    tracker: str = field(default="tensorboard", metadata=choices("tensorboard", "wandb", "none"))


@dataclass
class VARConfig:
    """Full VAR training config (sections model / data / train)."""

    model: VARModelConfig = field(default_factory=VARModelConfig)
    data: VARDataConfig = field(default_factory=VARDataConfig)
    train: VARTrainConfig = field(default_factory=VARTrainConfig)


#: Numeric bounds of single values (dotted key -> rule).
VAR_RANGES: Dict[str, Range] = {
    "train.tblr": Range(lo=0, lo_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.weight_decay_end": NON_NEGATIVE,
    "train.beta1": Range(lo=0, hi=1, hi_open=True),
    "train.beta2": Range(lo=0, hi=1, hi_open=True),
    "train.label_smoothing": Range(lo=0, hi=1, hi_open=True),
    "train.epochs": POSITIVE,
    "train.max_steps": NON_NEGATIVE,
    "train.warmup_epochs": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.warmup_start": FRACTION,
    "train.final_lr_ratio": NON_NEGATIVE,
    "train.ckpt_every": NON_NEGATIVE,
    "train.keep_last": NON_NEGATIVE,
    "train.log_every": NON_NEGATIVE,
    "train.seed": NON_NEGATIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.image_size": Range(lo=8),
    "model.mlp_ratio": Range(lo=0, lo_open=True),
    "model.drop_path_rate": Range(lo=0, hi=1, hi_open=True),
    "model.p_drop": Range(lo=0, hi=1, hi_open=True),
    "model.num_classes": POSITIVE,
}


def validate_var_model_config(cfg: VARModelConfig) -> VARModelConfig:
    """Raise ConfigError on impossible architecture values (depth, heads dividing the width, scales, branch
    geometry, cond_drop_rate in [0, 1)); return `cfg`."""
    if cfg.depth < 1:
        raise ConfigError(f"model.depth must be >= 1, got {cfg.depth}")
    if cfg.embed_dim % cfg.heads:
        raise ConfigError(f"model.width ({cfg.embed_dim}) must be divisible by model.num_heads ({cfg.heads})")
    if not cfg.patch_nums or any(p < 1 for p in cfg.patch_nums):
        raise ConfigError(f"model.patch_nums must be positive scale sides, got {cfg.patch_nums}")
    if cfg.num_branches < 1 or cfg.codebook_size < 2 or cfg.branch_dim < 1:
        raise ConfigError("model.num_branches, codebook_size and branch_dim must be positive")
    if not 0.0 <= cfg.cond_drop_rate < 1.0:
        raise ConfigError(f"model.cond_drop_rate must be in [0, 1), got {cfg.cond_drop_rate}")
    return cfg


def var_preset(name: str, **overrides: Any) -> VARModelConfig:
    """Preset architecture by name: d16, d17, d20, d24, d30 (MSVR10P2-4096 tokenizer geometry; width 64·depth,
    heads = depth, spec var.md §1.1). ConfigError for an unknown name or impossible `overrides`."""
    if name not in PRESET_DEPTHS:
        raise ConfigError(f"unknown VAR preset '{name}'; choose one of {', '.join(PRESET_DEPTHS)}")
    return validate_var_model_config(VARModelConfig(depth=PRESET_DEPTHS[name], **overrides))


def validate_var_config(cfg: VARConfig) -> VARConfig:
    """Check every bound once (model section, batch/accumulation, :data:`VAR_RANGES`); return `cfg`.

    Raises:
        ConfigError: one line naming the key and its allowed range.
    """
    validate_var_model_config(cfg.model)
    if cfg.train.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}")
    if cfg.train.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be >= 1, got {cfg.train.global_batch_size}")
    check_config_ranges(cfg, VAR_RANGES)
    return cfg


def load_var_config(source: Union[str, Path, Mapping[str, Any], None],
                    overrides: Optional[Iterable[str]] = None) -> VARConfig:
    """Load a VAR YAML (nested or flat keys) with ``key=value`` overrides, then :func:`validate_var_config`."""
    return validate_var_config(load_yaml_dataclass(source, VARConfig, overrides))


def var_model_config_from_dict(data: Mapping[str, Any]) -> VARModelConfig:
    """Build a validated :class:`VARModelConfig` from a plain dict (e.g. a checkpoint's config.yaml ``model``
    section). ConfigError for an unknown key, a wrong type or an impossible value."""
    return validate_var_model_config(load_yaml_dataclass(dict(data), VARModelConfig))
