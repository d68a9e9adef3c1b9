"""Typed configuration: every setting of a run, read from YAML, checked once, before anything is built.

``loader`` is the generic YAML → dataclass engine (nested or flat official keys, ``key=value`` overrides,
did-you-mean on typos, type coercion, ``choices`` and numeric range checks); ``tokenizer`` is the XQ-GAN
tokenizer schema (sections model/quant/loss/data/train, the one list of official keys xqtool ignores, the
validation of every bound and combination, the architecture hash); ``var`` is the VAR generator schema
(model/data/train, presets). Models take their own sections (``XQTokenizer(cfg.model, cfg.quant)``,
``VAR(cfg.model)``) and do not re-check them. This package imports only ``xqtool.errors`` and
``xqtool.validate`` (for the :class:`~xqtool.validate.Range` type); it never imports models, quantizers,
data, checkpoints or tasks.
"""

from xqtool.config.loader import config_to_dict, load_yaml_dataclass, save_config_yaml
from xqtool.config.tokenizer import (
    IGNORED_KEYS,
    DataConfig,
    IgnoredKey,
    LossConfig,
    ModelConfig,
    QuantConfig,
    TokenizerConfig,
    TrainConfig,
    arch_hash,
    cnn_ch_mult,
    config_hash,
    ignored_settings,
    load_tokenizer_config,
    tokenizer_config_from_args,
    validate_tokenizer_config,
)
from xqtool.config.var import (
    MSVR_PATCH_NUMS,
    PRESET_DEPTHS,
    VAR_PATCH_NUMS,
    VARConfig,
    VARDataConfig,
    VARModelConfig,
    VARTrainConfig,
    load_var_config,
    validate_var_config,
    validate_var_model_config,
    var_model_config_from_dict,
    var_preset,
)

__all__ = [
    "IGNORED_KEYS", "MSVR_PATCH_NUMS", "PRESET_DEPTHS", "VAR_PATCH_NUMS",
    "DataConfig", "IgnoredKey", "LossConfig", "ModelConfig", "QuantConfig", "TokenizerConfig", "TrainConfig",
    "VARConfig", "VARDataConfig", "VARModelConfig", "VARTrainConfig",
    "arch_hash", "cnn_ch_mult", "config_hash", "config_to_dict", "ignored_settings", "load_tokenizer_config",
    "load_var_config", "load_yaml_dataclass", "save_config_yaml", "tokenizer_config_from_args",
    "validate_tokenizer_config", "validate_var_config", "validate_var_model_config", "var_model_config_from_dict",
    "var_preset",
]
