"""Typed configuration: dataclasses, strict YAML loading, dotted overrides, validation.

A tokenizer config has five sections (``model``, ``quant``, ``loss``, ``data``, ``train``). YAML files
may be nested by section (xqtool style) or flat with the official XQ-GAN key names (every official
key lives in exactly one section, so a user's existing XQ-GAN YAML loads unchanged).

Overrides are ``key=value`` strings: ``quant.codebook_size=8192`` or the flat ``codebook_size=8192``;
values are parsed as YAML scalars/lists. Unknown keys raise :class:`ConfigError` with a
did-you-mean suggestion; wrong types name the key and the expected type. Impossible combinations
are rejected by :func:`validate_tokenizer_config` before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar, Union

import yaml

from xqtool.errors import ConfigError

T = TypeVar("T")


def _choices(*values: str) -> Dict[str, Any]:
    return {"choices": values}


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose booleans are only ``true``/``false`` (any case), as in YAML 1.2.

    YAML 1.1 also reads ``yes/no/on/off/y/n`` as booleans, which turns ``mixed_precision: no`` into
    ``False``. With this loader those words stay strings; boolean fields still accept them
    (:func:`_coerce` maps ``yes/on/y/1`` to True and ``no/off/n/0`` to False).
    """


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_TRUE_WORDS = ("true", "yes", "on", "y", "1")
_FALSE_WORDS = ("false", "no", "off", "n", "0")


def yaml_load(text: str) -> Any:
    """Parse YAML text safely with :class:`ConfigLoader` (no object construction, YAML 1.2 booleans)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader subclass


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Encoder/decoder architecture (spec §2)."""

    image_size: int = 256
    enc_type: str = field(default="dinov2", metadata=_choices("cnn", "dinov2"))
    dec_type: str = field(default="dinov2", metadata=_choices("cnn", "dinov2"))
    encoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    decoder_model: str = "vit_base_patch14_dinov2.lvd142m"
    vq_model: str = field(default="VQ-16", metadata=_choices("VQ-16", "VQ-8"))
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
    enc_tuning_method: str = field(default="full", metadata=_choices("full", "lora", "frozen"))
    dec_tuning_method: str = field(default="full", metadata=_choices("full", "lora", "frozen"))
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

    reconstruction_loss: str = field(default="l2", metadata=_choices("l1", "l2"))
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_weights: Optional[str] = None
    disc_type: str = field(default="dinodisc", metadata=_choices("patchgan", "stylegan", "dinodisc", "none"))
    disc_loss: str = field(default="hinge", metadata=_choices("hinge", "vanilla", "non_saturating"))
    gen_loss: str = field(default="hinge", metadata=_choices("hinge", "vanilla", "non_saturating"))
    disc_weight: float = 0.5
    disc_start: int = -1
    disc_epoch_start: int = 0
    disc_adaptive_weight: bool = True
    disc_weights: Optional[str] = None
    disc_reinit: int = 0
    norm_type: str = field(default="bn", metadata=_choices("bn", "gn", "none"))
    lecam_loss_weight: float = 0.0
    aug_prob: float = 1.0
    aug_fade_steps: int = 0
    semantic_guide: str = field(default="dinov2", metadata=_choices("dinov2", "clip", "none"))
    semantic_weights: Optional[str] = None
    detail_guide: str = field(default="none", metadata=_choices("none", "sam", "clip"))
    detail_weights: Optional[str] = None
    sem_loss_weight: float = 0.1
    detail_loss_weight: float = 0.1
    dependency_loss_weight: float = 0.0
    clip_norm: bool = False
    sem_loss_scale: float = 1.0
    detail_loss_scale: float = 1.0
    guide_type_1: str = field(default="class", metadata=_choices("class", "patch"))
    guide_type_2: str = field(default="class", metadata=_choices("class", "patch"))
    half_sem: bool = False


@dataclass
class DataConfig:
    """Where images come from (folders, file lists, WebDataset shards) and how bad files are handled."""

    data_path: Optional[str] = None
    val_data_path: Optional[str] = None
    dataset: str = "imagenet"
    num_workers: int = 4
    bad_files: str = field(default="skip", metadata=_choices("skip", "fail"))
    max_val_images: int = 0


@dataclass
class TrainConfig:
    """Optimisation, schedules, checkpoints and logging (spec §5.6–5.8)."""

    global_batch_size: int = 1024
    epochs: int = 200
    max_steps: int = 0
    lr: float = 1e-4
    lr_scale_rule: str = field(default="batch/128", metadata=_choices("batch/128", "none"))
    lr_scheduler: str = field(default="cosine", metadata=_choices("cosine", "constant", "none"))
    # "epoch": the reference's timm schedule stepped once per epoch (spec §5.6, xqtool/lr_schedule.py);
    # "step": xqtool's per-step schedule (linear warm-up over warmup_steps from ~0, then per-step cosine).
    lr_schedule: str = field(default="epoch", metadata=_choices("epoch", "step"))
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
    mixed_precision: str = field(default="bf16", metadata=_choices("no", "fp16", "bf16"))
    grad_accum: int = 1
    ema: bool = True
    ema_decay: float = 0.9999
    ckpt_every: int = 10000
    eval_every: int = 10000
    log_every: int = 100
    vis_every: int = 5000
    results_dir: str = "results_tokenizer_image"
    cloud_save_path: Optional[str] = None
    save_best: bool = True
    best_metric: str = field(default="rfid", metadata=_choices("rfid", "psnr", "ssim"))
    global_seed: int = 0
    tracker: str = field(default="tensorboard", metadata=_choices("tensorboard", "wandb", "none"))
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


# Official XQ-GAN keys that xqtool accepts and ignores (they have no effect on xqtool runs).
IGNORED_OFFICIAL_KEYS = frozenset(
    {"gpu", "no_wandb", "test_model", "compile", "vis_img", "wandb_project", "exp_index", "dataset_path"}
)


# Official keys xqtool accepts but does not act on: (section, key, default, why). A value other than the
# default is reported by :func:`ignored_settings` (one line each) when training starts.
_NO_EFFECT = (
    ("quant", "codebook_weight", 1.0, "declared but unused by the reference's loss as well (spec §1.3)"),
    ("quant", "codebook_show_usage", True, "codebook usage is always logged"),
    ("loss", "norm_type", "bn", "the DINO discriminator heads always use BatchNormLocal (norm_type bn, spec §5.4)"),
    ("loss", "disc_reinit", 0, "the discriminator is never re-initialised"),
    ("loss", "dependency_loss_weight", 0.0, "the branch dependency loss is not implemented (disabled in every "
                                            "released config)"),
    ("train", "vis_every", 5000, "reconstruction grids are written at every evaluation (train.eval_every)"),
    ("train", "vq_ckpt", None, "start from a checkpoint with `xqtool finetune --from CKPT` or resume with --resume"),
    ("train", "no_local_save", False, "checkpoints are always written under the output directory"),
)


def ignored_settings(cfg: "TokenizerConfig") -> List[str]:
    """One line per official key set to a value xqtool does not act on (empty when every such key is default)."""
    out = []
    for section, key, default, why in _NO_EFFECT:
        value = getattr(getattr(cfg, section), key)
        if value != default:
            out.append(f"{section}.{key}={value!r} has no effect in xqtool ({why}); ignored")
    return out


# --------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery (used by the tokenizer and the VAR configs)
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union or origin is getattr(types, "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return "optional " + " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list, Tuple, List):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is getattr(types, "UnionType", None):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list, Tuple, List):
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str):
            parts = [p for p in value.replace("_", ",").replace(" ", ",").split(",") if p]
            value = parts
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a {_type_name(tp)}, got {value!r}")
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin in (tuple, Tuple) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        number: Optional[float] = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # a mapping parsed elsewhere with YAML 1.1 booleans (no/off/yes/on)
            raise ConfigError(f"'{key}' must be a string, got {value!r}: quote it, e.g. '{key.split('.')[-1]}: \"no\"'")
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _build(cls: Type[T], data: Mapping[str, Any], where: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            scope = f"section '{where}'" if where else "the config"
            options = list(fields) + (list(_flat_index(cls)) if not where else [])
            raise ConfigError(f"unknown key '{full}' in {scope}{_suggest(str(key), options)}")
        tp = hints[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value or {}, full)
        else:
            value = _coerce(value, tp, full)
            choices = fields[key].metadata.get("choices")
            if choices and value not in choices and isinstance(value, str):
                same = [c for c in choices if str(c).lower() == value.lower()]  # 'No', 'BF16'
                value = same[0] if same else value
            if choices and value not in choices:
                raise ConfigError(
                    f"'{full}' must be one of {', '.join(map(str, choices))}; got {value!r}{_suggest(str(value), choices)}"
                )
            kwargs[key] = value
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Nested plain dict (tuples as lists) of a config dataclass, ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _flat_index(cls: type) -> Dict[str, str]:
    """Map each leaf field name of a sectioned config to its section name."""
    index: Dict[str, str] = {}
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            for leaf in _hints(tp):
                index[leaf] = name
    return index


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        index = _flat_index(cls)
        if parts[0] in index:
            parts = [index[parts[0]], parts[0]]
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Optional[Iterable[str]]) -> List[Tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML scalars or lists (``v_patch_nums=[1,2,4]``)."""
    result: List[Tuple[str, Any]] = []
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. quant.codebook_size=8192)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        result.append((key, value))
    return result


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML mapping with :func:`yaml_load` (safe; ConfigError if missing, unreadable or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _nest(data: Mapping[str, Any], cls: type, ignored: Iterable[str] = ()) -> Dict[str, Any]:
    """Accept section-nested and flat (official) keys alike; return a section-nested dict."""
    sections = {name for name, tp in _hints(cls).items() if _is_section(tp)}
    if not sections:
        return dict(data)
    index = _flat_index(cls)
    ignored = set(ignored)
    nested: Dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"section '{key}' must be a mapping, got {type(value).__name__}")
            nested.setdefault(key, {}).update(value)
        elif key in index:
            nested.setdefault(index[key], {})[key] = value
        elif key in ignored:
            continue
        else:
            raise ConfigError(f"unknown key '{key}'{_suggest(str(key), list(index) + sorted(sections))}")
    return nested


def load_yaml_dataclass(
    source: Union[str, Path, Mapping[str, Any], None],
    cls: Type[T],
    overrides: Optional[Iterable[str]] = None,
    ignored_keys: Iterable[str] = (),
) -> T:
    """Build dataclass `cls` from a YAML file or dict, applying dotted ``key=value`` overrides.

    Sectioned dataclasses (fields that are dataclasses) accept both nested and flat keys.
    """
    data: Dict[str, Any] = {}
    if source is not None:
        data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    tree = _nest(data, cls, ignored_keys)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value, cls)
    return _build(cls, tree, "")


# --------------------------------------------------------------------------------------------------
# Tokenizer config: load, validate, hash
# --------------------------------------------------------------------------------------------------

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


def latent_side(cfg: TokenizerConfig) -> int:
    """Side H = W of each branch's latent map implied by the encoder."""
    m = cfg.model
    if m.enc_type == "cnn":
        return m.image_size // (2 ** (len(cnn_ch_mult(m)) - 1))
    side = int(round(m.num_latent_tokens ** 0.5))
    return side


def validate_tokenizer_config(cfg: TokenizerConfig) -> TokenizerConfig:
    """Reject impossible combinations with a message that says what to change. Returns `cfg`."""
    m, q, loss, t = cfg.model, cfg.quant, cfg.loss, cfg.train
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
    if m.image_size < 8:
        raise ConfigError(f"model.image_size must be at least 8, got {m.image_size}")

    side = scales[-1]
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
    if loss.detail_guide != "none" and q.product_quant < 2:
        raise ConfigError("loss.detail_guide needs product_quant >= 2 (detail branch 0, semantic branch last)")
    if t.global_batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.global_batch_size and train.grad_accum must be positive")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    from xqtool.validate import TOKENIZER_CONFIG_RULES, check_config_ranges

    check_config_ranges(cfg, TOKENIZER_CONFIG_RULES)
    return cfg


def load_tokenizer_config(
    source: Union[str, Path, Mapping[str, Any], None] = None,
    overrides: Optional[Iterable[str]] = None,
    validate: bool = True,
) -> TokenizerConfig:
    """Load a tokenizer config from YAML (xqtool nested or official flat keys) plus overrides, then validate."""
    cfg = load_yaml_dataclass(source, TokenizerConfig, overrides, ignored_keys=IGNORED_OFFICIAL_KEYS)
    return validate_tokenizer_config(cfg) if validate else cfg


def tokenizer_config_from_args(args: Mapping[str, Any]) -> TokenizerConfig:
    """Config from an official checkpoint's ``args`` (argparse Namespace as a dict); unknown keys are dropped."""
    index = _flat_index(TokenizerConfig)
    known = {k: v for k, v in args.items() if k in index}
    return load_tokenizer_config(known)


def config_hash(cfg: TokenizerConfig) -> str:
    """12-hex fingerprint of the fields that decide which tokens a tokenizer produces (model + quant)."""
    tree = config_to_dict(cfg)
    arch = {
        section: {k: v for k, v in tree[section].items() if k not in _NON_ARCH_FIELDS.get(section, set())}
        for section in ("model", "quant")
    }
    blob = json.dumps(arch, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_config_yaml(cfg: Any) -> str:
    """YAML text of a config (nested sections)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
