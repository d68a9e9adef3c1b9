"""Checkpoints: xqtool's own format, safe loading, and official XQ-GAN `.pt` import.

xqtool format: a directory with ``model.safetensors`` (+ ``ema.safetensors``) and the resolved
``config.yaml``, written atomically (temp dir + rename).

Official XQ-GAN files are ``torch.save`` dicts with ``model`` / ``ema`` / ``optimizer`` /
``discriminator`` / ``optimizer_disc`` / ``steps`` / ``args`` (an ``argparse.Namespace``). They are
read with ``torch.load(weights_only=True)`` and an allow-list of exactly ``argparse.Namespace``;
nothing in the file can run code. Keys are mapped onto xqtool's names (teacher weights dropped,
LoRA-wrapped backbones merged), then loaded strictly: missing, unexpected or mis-shaped keys are
reported by name.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import yaml
from torch import Tensor, nn

from xqtool.config import TokenizerConfig, load_tokenizer_config, save_config_yaml, tokenizer_config_from_args
from xqtool.errors import CheckpointError, ConfigError, OutputError
from xqtool.fsutil import atomic_dir, checksums_enabled, recover_dir

PathLike = Union[str, Path]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"

# Prefixes of frozen teachers stored inside official checkpoints (not needed for inference).
TEACHER_PREFIXES = ("semantic_model.", "detail_model.")
# Persistent buffers of the reference that xqtool recomputes.
RECOMPUTED_KEYS = re.compile(r"(^|\.)lvl1LC$")


# ------------------------------------------------------------------------------------ safe loading


def safe_torch_load(path: PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with ``argparse.Namespace`` allowed; CheckpointError otherwise.

    A pickle that would import anything else (code execution) is refused, as are truncated or
    non-PyTorch files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a .pt/.pth file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        hint = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it references {hint.group(1)})" if hint else ""
        raise CheckpointError(
            f"{path} cannot be loaded safely{what}: only tensors and plain containers are allowed ({first[:120]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({msg[:160]})") from None


def one_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception message (YAML and safetensors errors span several lines)."""
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:limit]


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """CheckpointError naming the first floating-point tensor of `state` holding NaN or Inf.

    Used by every loader (a NaN weight silently turns encode into one token id per image) and by every
    writer (no save writes non-finite weights).
    """
    for name, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
            bad = _non_finite(value)
            if bad:
                raise CheckpointError(
                    f"{source}: tensor '{name}' holds {bad} non-finite value(s) (NaN/Inf); the weights are unusable"
                )


def _non_finite(t: Tensor) -> int:
    """Number of NaN/Inf entries of a floating tensor (numpy on the raw bits: fast on CPU, any float dtype)."""
    import numpy as np

    t = t.detach()
    if t.device.type != "cpu":
        return int((~torch.isfinite(t)).sum())
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:  # exponent bits all ones <=> Inf or NaN
        bits = t.view(torch.int16).numpy()
        return int(np.count_nonzero((bits & 0x7F80) == 0x7F80))
    if t.dtype in (torch.float16, torch.float32, torch.float64):
        return int(np.count_nonzero(~np.isfinite(t.numpy())))
    return int((~torch.isfinite(t.float())).sum())


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


DIGEST_KEY = "xqtool_sha256"


def tensors_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, by sorted name.

    Stored in the safetensors metadata (``xqtool_sha256``) by every xqtool writer and checked by the loaders, so
    a bit flip in the weights is reported instead of silently changing them.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def load_safetensors_checked(path: PathLike, device: str = "cpu") -> Dict[str, Tensor]:
    """Read a safetensors file; CheckpointError (one line naming the file) when it is missing, truncated,
    corrupt (xqtool's stored digest differs: a flipped bit) or holds a NaN/Inf weight (naming the tensor)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({one_line(exc)})") from None
    stored = meta.get(DIGEST_KEY)
    if stored and checksums_enabled() and tensors_digest(state) != stored:
        raise CheckpointError(f"{path} is corrupt: its weights do not match the checksum stored when it was written")
    check_finite(state, str(path))
    return state


def save_safetensors(state: Mapping[str, Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` with xqtool's content digest in the metadata (see :func:`tensors_digest`)."""
    from safetensors.torch import save_file

    state = _contiguous(state)
    save_file(state, str(path), metadata={**(metadata or {}), DIGEST_KEY: tensors_digest(state)})


def _load_safetensors(path: Path) -> Dict[str, Tensor]:
    return load_safetensors_checked(path)


# ------------------------------------------------------------------------------------ key mapping


def _merge_lora(state: Dict[str, Tensor], scale: float = 1.0) -> Dict[str, Tensor]:
    """Undo a peft LoRA wrapping: ``X.base_model.model.Y`` → ``X.Y``; W ← W + scale·B·A; keep modules_to_save copies."""
    out: Dict[str, Tensor] = {}
    lora_a: Dict[str, Tensor] = {}
    lora_b: Dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace(".base_model.model.", ".")
        m = re.match(r"(.*)\.lora_([AB])\.default\.weight$", key)
        if m:
            (lora_a if m.group(2) == "A" else lora_b)[m.group(1)] = value
            continue
        if ".original_module." in key:
            continue
        key = key.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        out[key] = value
    for module, a in lora_a.items():
        b = lora_b.get(module)
        weight = f"{module}.weight"
        if b is None or weight not in out:
            raise CheckpointError(f"LoRA weights for '{module}' are incomplete in the checkpoint")
        out[weight] = out[weight] + scale * (b.float() @ a.float()).to(out[weight].dtype)
    return out


def map_official_tokenizer_keys(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Official XQ-GAN ``VQModel`` state_dict → xqtool ``XQTokenizer`` names."""
    state = dict(state)
    if any(".lora_A." in k or ".base_model.model." in k for k in state):
        state = _merge_lora(state)
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(TEACHER_PREFIXES) or RECOMPUTED_KEYS.search(key):
            continue
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("quantizes."):
            key = "quantizer." + key
        elif key.startswith("quantize."):
            key = "quantizer.quantizes.0." + key[len("quantize.") :]
        out[key] = value
    return out


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load `state` into `model`; CheckpointError naming the first missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: {list(state[k].shape)} in {source} vs {list(own[k].shape)} in the model"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]

    def few(items: list) -> str:
        more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
        return ", ".join(items[:3]) + more

    if mismatched:
        raise CheckpointError(f"{source} does not fit the config: shape mismatch {few(mismatched)}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few(unexpected)}")
        raise CheckpointError(f"{source} does not fit the config: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


# ------------------------------------------------------------------------------------ xqtool format


def _contiguous(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_model_dir(
    directory: PathLike,
    state: Mapping[str, Tensor],
    config: Any,
    ema_state: Optional[Mapping[str, Tensor]] = None,
    extra_files: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write ``model.safetensors`` (+ ``ema.safetensors``) and ``config.yaml`` atomically into `directory`.

    Crash-safe: written as a temporary sibling, then swapped in (:func:`xqtool.fsutil.atomic_dir`), so a
    complete checkpoint exists at every instant. An existing `directory` is replaced only when it is an
    xqtool checkpoint (OutputError otherwise). Raises CheckpointError, before writing anything, when a
    weight (model or EMA) is NaN/Inf; OutputError on a full disk (earlier checkpoints intact).
    """
    directory = Path(directory)
    check_finite(state, f"refusing to save {directory}")
    if ema_state is not None:
        check_finite(ema_state, f"refusing to save {directory} (EMA)")
    recover_dir(directory)
    if directory.exists() and not is_xqtool_dir(directory):
        raise OutputError(f"{directory} exists and is not an xqtool checkpoint: refusing to replace it")
    with atomic_dir(directory, replace=True) as tmp:
        save_safetensors(state, tmp / MODEL_FILE, metadata={"format": "pt", "xqtool": "1"})
        if ema_state is not None:
            save_safetensors(ema_state, tmp / EMA_FILE, metadata={"format": "pt", "xqtool": "1"})
        (tmp / CONFIG_FILE).write_text(config if isinstance(config, str) else save_config_yaml(config))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


def save_tokenizer(
    directory: PathLike,
    tokenizer: nn.Module,
    ema_state: Optional[Mapping[str, Tensor]] = None,
    extra_files: Optional[Mapping[str, str]] = None,
    config: Optional[TokenizerConfig] = None,
) -> Path:
    """Save an :class:`XQTokenizer` (and optionally its EMA weights) in xqtool's format.

    ``config.yaml`` holds `config` (a trainer passes its whole run config) or else the tokenizer's own
    ``model``/``quant`` sections.
    """
    conf = config if config is not None else tokenizer.config_dict()
    return save_model_dir(directory, tokenizer.state_dict(), conf, ema_state, extra_files)


def is_xqtool_dir(path: PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------ official format


def _args_dict(args: Any) -> Dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def read_official_tokenizer(path: PathLike, prefer_ema: bool = True) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Official XQ-GAN file → (xqtool-named state_dict, args dict). Raises CheckpointError on foreign files."""
    blob = safe_torch_load(path)
    if not isinstance(blob, Mapping):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not an XQ-GAN checkpoint dict")
    if "trainer" in blob or "var_wo_ddp" in blob:
        raise CheckpointError(f"{path} is a VAR generator checkpoint, not a tokenizer (use it with `xqtool sample`)")
    order = ("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")
    state = next((blob[k] for k in order if isinstance(blob.get(k), Mapping)), None)
    if state is None:
        if blob and all(isinstance(v, Tensor) for v in blob.values()):
            state = blob  # a bare state_dict
        else:
            keys = ", ".join(list(map(str, blob.keys()))[:6])
            raise CheckpointError(f"{path} has no 'ema', 'model' or 'state_dict' entry (top-level keys: {keys})")
    if not any(str(k).startswith(("encoder.", "decoder.", "quantize")) for k in state):
        raise CheckpointError(f"{path} does not look like an XQ-GAN tokenizer (no encoder/decoder/quantizer keys)")
    state = map_official_tokenizer_keys(state)
    check_finite(state, str(path))
    return state, _args_dict(blob.get("args"))


def fit_vit_config(cfg: TokenizerConfig, state: Mapping[str, Tensor], source: str = "checkpoint") -> TokenizerConfig:
    """The config of an official file whose ``args`` cannot express its ViT size, fitted to the tensor shapes.

    Official ``args`` name a timm model (e.g. ViT-B) but the tensors decide: width E from
    ``encoder.model.pos_embed`` ``[1, T, E]``, depth from the ``encoder.model.blocks.{i}`` count, patch size from
    ``encoder.model.patch_embed.proj.weight`` ``[E, 3, p, p]``; the decoder must agree. Attention heads cannot be
    read from shapes: when the width differs from the named model, heads = E / 64 (the head width of every
    DINOv2/ViT size) if that divides, else CheckpointError (one line) asking for a config. CNN configs and
    states that already fit are returned unchanged.
    """
    if cfg.model.enc_type != "dinov2" or "encoder.model.pos_embed" not in state:
        return cfg
    import dataclasses

    from xqtool.models.tokenizer import build_tokenizer

    def depth(prefix: str) -> int:
        return 1 + max((int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.model\.blocks\.(\d+)\.", k))),
                       default=-1)

    width = int(state["encoder.model.pos_embed"].shape[-1])
    enc_depth, dec_depth = depth("encoder"), depth("decoder")
    dec_width = int(state["decoder.model.pos_embed"].shape[-1]) if "decoder.model.pos_embed" in state else width
    if (dec_width, dec_depth) != (width, enc_depth):
        raise CheckpointError(f"{source}: encoder ViT ({width} wide, {enc_depth} blocks) and decoder ViT ({dec_width} "
                              f"wide, {dec_depth} blocks) differ; xqtool needs one ViT size for both")
    patch = state.get("encoder.model.patch_embed.proj.weight")
    with torch.device("meta"):
        probe = build_tokenizer(cfg)
    own = probe.state_dict()
    same = (tuple(own["encoder.model.pos_embed"].shape[-1:]) == (width,)
            and sum(1 for k in own if re.match(r"encoder\.model\.blocks\.\d+\.norm1\.weight$", k)) == enc_depth
            and (patch is None or tuple(own["encoder.model.patch_embed.proj.weight"].shape) == tuple(patch.shape)))
    if same:
        return cfg
    heads = cfg.model.vit_num_heads
    if width != int(own["encoder.model.pos_embed"].shape[-1]):
        if width % 64:
            raise CheckpointError(f"{source}: its ViT is {width} wide ({enc_depth} blocks), not the "
                                  f"{cfg.model.encoder_model} its args name, and the number of attention heads "
                                  f"cannot be read from the tensors: pass --config with model.vit_num_heads")
        heads = width // 64
    model = dataclasses.replace(cfg.model, vit_embed_dim=width, vit_depth=enc_depth, vit_num_heads=heads,
                                vit_patch_size=int(patch.shape[-1]) if patch is not None else cfg.model.vit_patch_size)
    return dataclasses.replace(cfg, model=model)


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
    """
    from xqtool.hub import resolve_checkpoint
    from xqtool.models.tokenizer import build_tokenizer

    if "://" not in str(path):
        recover_dir(Path(path))  # a crash mid-replacement left only the aside copy: restore it first
    path = resolve_checkpoint(path, kind="tokenizer")
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
        state = _load_safetensors(weights)
        source = str(weights)
    else:
        if path.suffix == ".safetensors":
            state, args = map_official_tokenizer_keys(_load_safetensors(path)), {}
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
    with torch.device("meta"):
        probe = build_tokenizer(cfg)
    own_keys = probe.state_dict()
    _check_fit(own_keys, state, source)
    tok = build_tokenizer(cfg)
    load_state_strict(tok, state, source)
    return tok.to(map_location).eval()


def _check_fit(own: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    """Cheap pre-check on the meta model so a wrong file fails before the real model is allocated."""
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    if mismatched or missing or any(k not in own for k in state):
        load_state_strict(_ShapeOnly(own), state, source)


class _ShapeOnly(nn.Module):
    """Minimal module whose state_dict is a given shape table (for error reporting only)."""

    def __init__(self, table: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._table = dict(table)

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Tensor]:  # type: ignore[override]
        return self._table


def read_config_yaml(directory: PathLike) -> Dict[str, Any]:
    """The raw ``config.yaml`` mapping of an xqtool checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path}: {one_line(exc)}") from None
    if data is None:
        raise CheckpointError(f"{path} is empty")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a YAML mapping")
    return data
