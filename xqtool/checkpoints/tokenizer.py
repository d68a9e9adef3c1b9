"""Tokenizer checkpoints: save in xqtool's own format, load it or an official XQ-GAN ``.pt`` / ``.safetensors``.

Own format: a directory with ``model.safetensors`` (+ ``ema.safetensors``) and the resolved ``config.yaml``,
written atomically (:func:`xqtool.checkpoints.safe_io.write_checkpoint_dir`). Official files are mapped by
:func:`xqtool.checkpoints.official.map_official_tokenizer_keys`, then loaded strictly: missing, unexpected or
mis-shaped keys are reported by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from xqtool.checkpoints.official import fit_vit_config, map_official_tokenizer_keys, read_official_tokenizer
from xqtool.checkpoints.safe_io import (CONFIG_FILE, EMA_FILE, MODEL_FILE, PathLike, check_state_fits, is_xqtool_dir,
                                        load_safetensors_checked, load_state_strict, locate_checkpoint,
                                        read_yaml_mapping, write_checkpoint_dir)
from xqtool.config import TokenizerConfig, load_tokenizer_config, save_config_yaml, tokenizer_config_from_args
from xqtool.errors import CheckpointError, ConfigError

#: safetensors metadata of a tokenizer checkpoint's weights files
TOKENIZER_METADATA = {"format": "pt", "xqtool": "1"}


def weights_fingerprint(tokenizer: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the quantizer's weights: codebooks and residual convolutions.

    Token ids only mean something together with these weights; a tokenizer with the same config but other
    weights has another fingerprint. Hashed as float32 bytes by sorted parameter name, so device and load
    path do not matter (statistics buffers such as codebook-usage EMAs are excluded).
    """
    quantizer = getattr(tokenizer, "quantizer", tokenizer)
    h = hashlib.sha256()
    for name, p in sorted(quantizer.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{list(t.shape)}\n".encode())
        h.update(t.numpy())
    return h.hexdigest()[:16]


def save_model_dir(
    directory: PathLike,
    state: Mapping[str, Tensor],
    config: Any,
    ema_state: Optional[Mapping[str, Tensor]] = None,
    extra_files: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write a tokenizer checkpoint directory: `state` (+ `ema_state`) and `config` (a TokenizerConfig or YAML text).

    Raises CheckpointError (nothing written) for a NaN/Inf weight, OutputError when `directory` exists and is not
    an xqtool checkpoint or the disk is full (see :func:`~xqtool.checkpoints.safe_io.write_checkpoint_dir`).
    """
    weights = {MODEL_FILE: state} if ema_state is None else {MODEL_FILE: state, EMA_FILE: ema_state}
    text = config if isinstance(config, str) else save_config_yaml(config)
    return write_checkpoint_dir(directory, weights, text, TOKENIZER_METADATA, extra_files=extra_files)


def save_tokenizer(
    directory: PathLike,
    tokenizer: nn.Module,
    ema_state: Optional[Mapping[str, Tensor]] = None,
    extra_files: Optional[Mapping[str, str]] = None,
    config: Optional[TokenizerConfig] = None,
) -> Path:
    """Save an :class:`XQTokenizer` (and optionally its EMA weights) in xqtool's format (see :func:`save_model_dir`).

    ``config.yaml`` holds `config` (a trainer passes its whole run config) or else the tokenizer's own
    ``model``/``quant`` sections.
    """
    conf = config if config is not None else tokenizer.config_dict()
    return save_model_dir(directory, tokenizer.state_dict(), conf, ema_state, extra_files)


def read_config_yaml(directory: PathLike) -> Dict[str, Any]:
    """The raw ``config.yaml`` mapping of an xqtool checkpoint directory (CheckpointError when unreadable)."""
    return read_yaml_mapping(Path(directory) / CONFIG_FILE)


def _resolve_config(config: Union[None, PathLike, TokenizerConfig, Mapping[str, Any]]) -> Optional[TokenizerConfig]:
    if config is None or isinstance(config, TokenizerConfig):
        return config
    return load_tokenizer_config(config)


def load_tokenizer(
    path: PathLike,
    config: Union[None, PathLike, TokenizerConfig, Mapping[str, Any]] = None,
    map_location: Union[str, torch.device] = "cpu",
    prefer_ema: bool = True,
) -> nn.Module:
    """Load an xqtool checkpoint directory or an official XQ-GAN ``.pt`` into an :class:`XQTokenizer` (eval mode).

    Config: `config` when given, else the directory's ``config.yaml`` or the official file's ``args``.
    `path` may also be a registry name (``MSVR10P2-4096``) or ``hf://`` reference (:func:`xqtool.hub.resolve_checkpoint`).
    Raises CheckpointError for missing, foreign, corrupt or non-fitting files (one line naming the file).
    """
    from xqtool.models.tokenizer import build_tokenizer

    path = locate_checkpoint(path, "tokenizer")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    cfg = _resolve_config(config)
    if path.is_dir():
        if not is_xqtool_dir(path):
            raise CheckpointError(f"{path} is not an xqtool checkpoint directory (needs {MODEL_FILE} and {CONFIG_FILE})")
        if cfg is None:
            if read_config_yaml(path).get("format") == "xqtool-var":
                raise CheckpointError(f"{path} is a VAR generator checkpoint, not a tokenizer (use it with `xqtool sample --var`)")
            try:
                cfg = load_tokenizer_config(path / CONFIG_FILE)
            except ConfigError as exc:
                raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from None
        weights = path / (EMA_FILE if prefer_ema and (path / EMA_FILE).is_file() else MODEL_FILE)
        state = load_safetensors_checked(weights)
        source = str(weights)
    else:
        if path.suffix == ".safetensors":
            state, args = map_official_tokenizer_keys(load_safetensors_checked(path)), {}
        else:
            state, args = read_official_tokenizer(path, prefer_ema=prefer_ema)
        if cfg is None:
            if not args:
                raise CheckpointError(f"{path} carries no config ('args'): pass --config CFG.yaml")
            try:
                cfg = tokenizer_config_from_args(args)
            except ConfigError as exc:
                raise CheckpointError(f"the config stored in {path} is invalid: {exc}") from None
            cfg = fit_vit_config(cfg, state, str(path))
        source = str(path)
    lead = f"{source} does not fit the config"
    with torch.device("meta"):  # a wrong file fails before the real model is allocated
        check_state_fits(build_tokenizer(cfg).state_dict(), state, lead)
    tok = build_tokenizer(cfg)
    load_state_strict(tok, state, lead)
    return tok.to(map_location).eval()
