"""Fine-tuning modes for a tokenizer's encoder / decoder (spec §6): ``full``, ``lora`` (peft), ``frozen``,
plus codebook freezing, LoRA merging and adapter export.

The *backbone* of a part is ``tok.encoder.model`` / ``tok.decoder.model`` for ViT parts (timm
VisionTransformer) and the whole ``tok.encoder`` / ``tok.decoder`` for CNN parts. Everything outside the
backbone (latent tokens, level embeddings, ``to_pixel``, quant convs, quantizers) stays trainable unless
frozen explicitly (``freeze_codebook``). Model surgery only (imports peft and ``xqtool.errors``); reading
LoRA-wrapped official state dicts is :func:`xqtool.checkpoints.official.map_official_tokenizer_keys`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from torch import nn

from xqtool.errors import ConfigError

log = logging.getLogger(__name__)

TUNING_METHODS = ("full", "lora", "frozen")
DEFAULT_LORA_TARGETS = r".*\.mlp\.fc\d"


def _backbone(tok: nn.Module, part: str) -> Tuple[nn.Module, str, nn.Module, bool]:
    """(parent, attribute name, backbone module, is_vit) of `part` ('encoder' | 'decoder')."""
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    holder = getattr(tok, part)
    inner = getattr(holder, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "blocks"):
        return holder, "model", inner, True
    if inner is not None and type(inner).__name__ == "PeftModel":
        return holder, "model", inner, True
    return tok, part, holder, False


def apply_tuning(
    tok: nn.Module,
    part: str,
    method: str,
    *,
    rank: int = 8,
    alpha: Optional[float] = None,
    targets: str = DEFAULT_LORA_TARGETS,
) -> Dict[str, int]:
    """Apply `method` to the backbone of `part` in place; returns {"trainable": n, "frozen": n} of that backbone.

    * ``full``: nothing changes (all parameters trainable).
    * ``frozen``: ``requires_grad=False`` on every backbone parameter.
    * ``lora``: peft LoRA on modules whose name matches the regex `targets` (rank `rank`, lora_alpha `alpha` or
      `rank` → scale 1), final ``norm`` kept as a trainable copy for ViT backbones; peft freezes the rest of the
      backbone. For CNN parts `targets` must name conv layers (the ViT default is refused).
    """
    if method not in TUNING_METHODS:
        raise ConfigError(f"tuning method for the {part} must be one of {', '.join(TUNING_METHODS)}, got {method!r}")
    parent, attr, backbone, is_vit = _backbone(tok, part)
    if method == "frozen":
        backbone.requires_grad_(False)
    elif method == "lora":
        if not is_vit and targets == DEFAULT_LORA_TARGETS:
            raise ConfigError(
                f"LoRA on the CNN {part} needs conv targets: pass --lora-targets REGEX (e.g. '.*conv.*') or use "
                f"--{part[:3]} full/frozen"
            )
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=int(rank),
            lora_alpha=float(alpha) if alpha is not None else float(rank),
            target_modules=targets,
            modules_to_save=["norm"] if is_vit else None,
        )
        try:
            wrapped = get_peft_model(backbone, lcfg)
        except ValueError as exc:
            raise ConfigError(
                f"LoRA targets {targets!r} match no supported layer of the {part}: "
                f"{str(exc).splitlines()[0][:160]}"
            ) from None
        setattr(parent, attr, wrapped)
        backbone = wrapped
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    log.info("%s: %s (%d trainable / %d frozen backbone parameters)", part, method, trainable, frozen)
    return {"trainable": trainable, "frozen": frozen}


def freeze_codebook(tok: nn.Module) -> List[str]:
    """Freeze what defines the meaning of a token id; returns the frozen parameter names.

    A token id means "code vector k of branch b at scale s, passed through that scale's φ conv and
    accumulated into f_hat". So the codebook embeddings and the φ (quant_resi) convs — every quantizer
    parameter — are frozen, and ``quant_conv`` too, so the encoder keeps producing latents in the space the
    codebook was fitted to (and teacher projections keep their target). ``post_quant_conv`` and the decoder
    may still adapt: ids decode to the same f_hat, only its rendering into pixels is fine-tuned.
    """
    names: List[str] = []
    for prefix, module in (("quantizer", getattr(tok, "quantizer", None)), ("quant_conv", getattr(tok, "quant_conv", None))):
        if module is None:
            continue
        for n, p in module.named_parameters():
            p.requires_grad_(False)
            names.append(f"{prefix}.{n}")
    return names


def has_lora(tok: nn.Module) -> bool:
    """True when the encoder or decoder backbone is wrapped by peft."""
    return any(type(_backbone(tok, part)[2]).__name__ == "PeftModel" for part in ("encoder", "decoder"))


def merge_lora(tok: nn.Module) -> nn.Module:
    """Merge LoRA weights into the base layers and unwrap peft, in place; returns `tok`."""
    for part in ("encoder", "decoder"):
        parent, attr, backbone, _ = _backbone(tok, part)
        if type(backbone).__name__ == "PeftModel":
            setattr(parent, attr, backbone.merge_and_unload())
    return tok


def save_adapters(tok: nn.Module, directory: Path) -> List[Path]:
    """Save each LoRA adapter alone with peft ``save_pretrained`` into ``directory/adapter_{part}``."""
    out: List[Path] = []
    for part in ("encoder", "decoder"):
        _, _, backbone, _ = _backbone(tok, part)
        if type(backbone).__name__ == "PeftModel":
            d = Path(directory) / f"adapter_{part}"
            backbone.save_pretrained(str(d))
            out.append(d)
    return out


__all__ = ["DEFAULT_LORA_TARGETS", "TUNING_METHODS", "apply_tuning", "freeze_codebook", "has_lora", "merge_lora",
           "save_adapters"]
