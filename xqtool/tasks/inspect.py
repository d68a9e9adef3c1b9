"""`xqtool inspect`: what a config or checkpoint describes, without building teachers or touching the network."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from xqtool.checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    TEACHER_PREFIXES,
    is_xqtool_dir,
    safe_torch_load,
)
from xqtool.config import TokenizerConfig, config_hash, load_tokenizer_config, tokenizer_config_from_args
from xqtool.errors import CheckpointError


@dataclass
class InspectReport:
    """Facts about a tokenizer config / checkpoint."""

    source: str
    kind: str  # "config" | "xqtool checkpoint" | "official checkpoint"
    config: TokenizerConfig
    config_hash: str
    parameters: Dict[str, int]
    tokens: List[Dict[str, int]]  # one row per scale: scale index, side, tokens per branch
    warnings: List[str] = field(default_factory=list)


def _official_info(path: Path) -> tuple:
    blob = safe_torch_load(path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} is not an XQ-GAN checkpoint dict")
    if "trainer" in blob:
        raise CheckpointError(f"{path} is a VAR generator checkpoint, not a tokenizer")
    args = blob.get("args")
    args = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    warnings = []
    state = blob.get("ema") or blob.get("model") or {}
    teacher = sum(v.numel() for k, v in state.items() if k.startswith(TEACHER_PREFIXES))
    if teacher:
        warnings.append(f"checkpoint holds {teacher:,} frozen teacher parameters (dropped for inference)")
    if "ema" not in blob:
        warnings.append("no EMA weights in the checkpoint; the raw 'model' weights will be used")
    if "steps" in blob:
        warnings.append(f"trained for {int(blob['steps']):,} steps")
    return args, warnings


def inspect_target(target: str, overrides: Optional[Iterable[str]] = None) -> InspectReport:
    """Resolve the config of a YAML file, xqtool checkpoint dir or official `.pt` and describe it."""
    from xqtool.models.tokenizer import build_tokenizer, count_parameters

    path = Path(target)
    warnings: List[str] = []
    if not path.exists():
        raise CheckpointError(f"not found: {path}")
    if path.is_dir():
        if not is_xqtool_dir(path):
            raise CheckpointError(f"{path} is not an xqtool checkpoint directory")
        cfg = load_tokenizer_config(path / CONFIG_FILE, overrides)
        kind = "xqtool checkpoint"
        if not (path / EMA_FILE).is_file():
            warnings.append("no ema.safetensors: the raw weights will be used")
    elif path.suffix in (".yaml", ".yml"):
        cfg = load_tokenizer_config(path, overrides)
        kind = "config"
    else:
        args, warnings = _official_info(path)
        if not args:
            raise CheckpointError(f"{path} carries no config ('args'); inspect its YAML config instead")
        cfg = tokenizer_config_from_args(args)
        if overrides:
            from xqtool.config import config_to_dict

            cfg = load_tokenizer_config(config_to_dict(cfg), overrides)
        kind = "official checkpoint"

    with torch.device("meta"):
        tok = build_tokenizer(cfg)
    params = {
        "encoder": count_parameters(tok.encoder),
        "decoder": count_parameters(tok.decoder),
        "quantizer": count_parameters(tok.quantizer),
        "quant_conv + post_quant_conv": count_parameters(tok.quant_conv) + count_parameters(tok.post_quant_conv),
    }
    params["total"] = count_parameters(tok)
    rows = [{"scale": i, "side": pn, "tokens": pn * pn} for i, pn in enumerate(cfg.scales)]
    q = cfg.quant
    if q.alpha > 0 and q.beta > 0:
        warnings.append("RobustTok latent perturbation (alpha/beta) is not implemented; training ignores it")
    if cfg.loss.semantic_guide != "none" and not cfg.loss.semantic_weights:
        warnings.append(
            f"training needs {cfg.loss.semantic_guide} teacher weights (loss.semantic_weights or env var); "
            "inference does not"
        )
    if cfg.model.enc_type == "dinov2" and not cfg.model.encoder_weights:
        warnings.append("training from scratch starts the ViT from random init unless model.encoder_weights is set")
    return InspectReport(str(path), kind, cfg, config_hash(cfg), params, rows, warnings)
