"""Loading pretrained ViT backbone weights (DINOv2, CLIP, DINO discriminator) — downloaded only when asked (``hub``).

Source order (DESIGN "Pretrained backbones"): explicit path (or ``hub`` / ``hf://OWNER/REPO/FILE``, fetched through the
Hugging Face cache, see :mod:`xqtool.hub`) → environment variable (same forms) → the local Hugging Face hub /
timm (torch hub) cache, read strictly offline → :class:`~xqtool.errors.WeightsMissingError` saying how to provide them.

Original DINOv2 weights (patch 14, 37×37 grid) are adapted to a patch-16 / 16×16 model with timm's
``checkpoint_filter_fn`` (``resample_patch_embed`` for the kernel, ``resample_abs_pos_embed`` for the grid, bicubic
with antialias; tokenizer spec §2.3). Files are read with ``safetensors`` or the one safe ``torch.load``
(:func:`xqtool.checkpoints.safe_io.safe_torch_load`) and loaded strictly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from xqtool.checkpoints.safe_io import load_safetensors_checked, load_state_strict, safe_torch_load
from xqtool.errors import CheckpointError, WeightsMissingError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: environment variable naming the DINOv2 weights of the ViT tokenizer backbones
DINOV2_ENV_VAR = "XQTOOL_DINOV2_WEIGHTS"
#: file names looked up inside a weights directory / a hub snapshot, in order
WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def model_name_of(model: nn.Module) -> str:
    """The timm name (``architecture.tag``) a backbone was created from, e.g. ``vit_base_patch14_dinov2.lvd142m``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    tag = cfg.get("tag")
    return f"{arch}.{tag}" if tag else str(arch)


def _file_in(path: Path) -> Optional[Path]:
    """``path`` itself when it is a weights file, else the first known weights file inside the directory."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILENAMES:
            if (path / name).is_file():
                return path / name
    return None


def cached_weights_file(model_name: str) -> Optional[Path]:
    """A weights file for ``model_name`` in the local HF hub cache or the torch-hub checkpoint dir (no network)."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # unknown name / no pretrained cfg
        cfg = None
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id = hub_id.split("@")[0]
            for name in (getattr(cfg, "hf_hub_filename", None), *WEIGHT_FILENAMES):
                if not name:
                    continue
                try:
                    hit = try_to_load_from_cache(repo_id, name)
                except Exception:  # malformed cache / repo id: treat as absent
                    hit = None
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    url = getattr(cfg, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(
    model_name: str, source: Optional[PathLike], env_var: str, *, use_cache: bool = True
) -> tuple[Optional[Path], str]:
    """Find the weights file: (path or None, where it came from).

    ``source`` / ``$env_var`` may also be ``hub`` (timm's Hub repository of `model_name`, through the Hugging Face
    cache) or ``hf://OWNER/REPO/FILE`` (:func:`xqtool.hub.resolve_weights_reference`). An explicit ``source`` or a set ``env_var`` that points nowhere raises WeightsMissingError (a user mistake).
    """
    from xqtool.hub import resolve_weights_reference

    if source:
        hub_file = resolve_weights_reference(source, label=model_name, model_name=model_name)
        if hub_file is not None:
            return hub_file, "hub"
        found = _file_in(Path(source).expanduser())
        if found is None:
            raise WeightsMissingError(
                f"weights path '{source}' for '{model_name}' does not exist or holds no "
                f"{'/'.join(WEIGHT_FILENAMES)}: give an existing .pth/.safetensors file or directory"
            )
        return found, "path"
    env_value = os.environ.get(env_var, "").strip()
    if env_value:
        hub_file = resolve_weights_reference(env_value, label=model_name, model_name=model_name)
        if hub_file is not None:
            return hub_file, env_var
        found = _file_in(Path(env_value).expanduser())
        if found is None:
            raise WeightsMissingError(
                f"{env_var}='{env_value}' does not exist or holds no weights file: "
                f"point it to a timm .pth/.safetensors file or unset it"
            )
        return found, env_var
    if use_cache:
        found = cached_weights_file(model_name)
        if found is not None:
            return found, "cache"
    return None, ""


def weights_available(
    source: Optional[PathLike] = None,
    *,
    env_var: str,
    model_name: Optional[str] = None,
    use_cache: bool = True,
) -> bool:
    """True when weights can be found offline: existing ``source``, existing ``$env_var``, or (with a timm
    ``model_name``) the local hub cache. Never raises for missing paths and never reads the weights.
    """
    try:
        path, _ = resolve_weights(model_name or "", source, env_var, use_cache=use_cache and bool(model_name))
    except WeightsMissingError:
        return False
    return path is not None


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.bin`` file, unwrapping ``model`` / ``state_dict``.

    Read through :func:`~xqtool.checkpoints.safe_io.safe_torch_load` (pickles) or
    :func:`~xqtool.checkpoints.safe_io.load_safetensors_checked`; CheckpointError
    ``cannot read weights file ...`` (one line) for an unreadable, unsafe or non-state_dict file.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            sd = load_safetensors_checked(path)
        else:
            sd = safe_torch_load(path)
    except Exception as exc:  # corrupt / pickled objects / not a weights file
        raise CheckpointError(f"cannot read weights file '{path}': {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"weights file '{path}' holds a {type(sd).__name__}, not a state_dict")
    for key in ("model", "state_dict"):
        inner = sd.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            sd = inner
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a timm / original DINOv2 / OpenAI CLIP state_dict onto ``model`` (a timm ViT).

    Resamples the patch kernel (e.g. 14→16, ``resample_patch_embed``) and the pos-embed grid (e.g. 37×37→16×16,
    ``resample_abs_pos_embed``, cls slot kept) via timm's ``checkpoint_filter_fn``; drops the patch embedding when the
    model has none (ViT decoder) and classifier heads the model does not have.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = dict(state_dict)
    if not isinstance(getattr(getattr(model, "patch_embed", None), "proj", None), nn.Module):
        sd = {k: v for k, v in sd.items() if not k.startswith("patch_embed.")}
    sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    for prefix in ("head.", "fc_norm.", "head_drop."):
        if not any(k.startswith(prefix) for k in own):
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    sd.pop("mask_token", None)
    return sd


def load_backbone_weights(
    model: nn.Module,
    source: Optional[PathLike],
    *,
    kind: str,
    env_var: str,
    config_key: str = "model.encoder_weights",
    model_name: Optional[str] = None,
    use_cache: bool = True,
) -> str:
    """Load pretrained weights into the timm ViT ``model`` in place; returns the file used.

    ``kind`` is a human label ("DINOv2", "CLIP", …) used in messages; ``config_key`` is the config field named in the
    error. Raises WeightsMissingError when nothing is found, CheckpointError when the file does not fit the model.
    """
    name = model_name or model_name_of(model)
    path, origin = resolve_weights(name, source, env_var, use_cache=use_cache)
    if path is None:
        raise WeightsMissingError(
            f"{kind} weights for '{name}' not found: pass --set {config_key}=PATH or set {env_var}=PATH "
            f"(a timm .pth/.safetensors file)"
        )
    sd = adapt_state_dict(read_state_dict(path), model)
    load_state_strict(model, sd, f"{kind} weights '{path}' do not fit '{name}'")
    logger.info("loaded %s weights for %s from %s (%s)", kind, name, path, origin)
    return str(path)


def load_vit_tokenizer_weights(
    module: nn.Module,
    source: Optional[PathLike],
    *,
    config_key: str = "model.encoder_weights",
    use_cache: bool = True,
) -> str:
    """Load DINOv2 weights into a :class:`~xqtool.models.vit.ViTEncoder` / ``ViTDecoder`` backbone (``module.model``).

    Source order as :func:`load_backbone_weights` with ``$XQTOOL_DINOV2_WEIGHTS``; the decoder simply drops the patch
    kernel. Latent tokens, level embeddings, mask token and ``to_pixel`` keep their random init.
    """
    backbone = getattr(module, "model", module)
    return load_backbone_weights(
        backbone, source, kind="DINOv2", env_var=DINOV2_ENV_VAR, config_key=config_key, use_cache=use_cache
    )
