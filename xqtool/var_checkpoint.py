"""VAR checkpoints: xqtool's own format and the released ``ar-ckpt-last.pth`` layout (spec var.md §5).

Own format: a directory with ``model.safetensors`` (VAR state_dict) and ``config.yaml`` (``model:`` section
plus optional ``tokenizer:`` info), written atomically (temp dir + rename).

Official format: ``torch.load(weights_only=True)`` (small allow-list, never plain pickle), then
``ckpt['trainer']['var_wo_ddp']`` (or a bare VAR state_dict as in FoundationVision's ``var_dXX.pth``).
Names map 1:1; the derived buffers ``lvl_1L``, ``attn_bias_for_masking`` and ``*.zero_k_bias`` are
ignored (recomputed). The architecture is inferred from the tensor shapes; the scale list comes from the
file (``trainer.config.patch_nums`` / ``args.pn``), the caller, or the MSVR default when L matches.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml
from safetensors.torch import load_file


from xqtool.config import MSVR_PATCH_NUMS, VAR_PATCH_NUMS, VARModelConfig, config_to_dict, var_model_config_from_dict
from xqtool.errors import CheckpointError, ConfigError, OutputError
from xqtool.fsutil import atomic_dir, recover_dir
from xqtool.models.var import VAR

log = logging.getLogger(__name__)

__all__ = ["save_var", "load_var", "load_official_var_state", "var_config_from_state_dict",
           "load_var_state_strict", "safe_load_pth", "DERIVED_KEYS"]

DERIVED_KEYS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")


def safe_load_pth(path: Union[str, Path], map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a minimal allow-list (argparse.Namespace, pathlib paths).

    Raises CheckpointError for missing, corrupt or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    allow = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file, reported in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            raise CheckpointError(f"{path} holds objects outside the safe allow-list ({msg[:160]}); "
                                  "re-save it with only tensors and plain Python values") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {msg[:200]}") from None


def _patch_nums_from_meta(ckpt: Mapping[str, Any]) -> Optional[Tuple[int, ...]]:
    trainer = ckpt.get("trainer")
    if isinstance(trainer, Mapping):
        conf = trainer.get("config")
        if isinstance(conf, Mapping) and conf.get("patch_nums"):
            return tuple(int(p) for p in conf["patch_nums"])
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        if args.get("patch_nums"):
            return tuple(int(p) for p in args["patch_nums"])
        pn = args.get("pn")
        if isinstance(pn, str) and re.fullmatch(r"\d+(_\d+)*", pn) and "_" in pn:
            return tuple(int(p) for p in pn.split("_"))
    return None


def load_official_var_state(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read an official VAR file → (VAR state_dict without derived buffers, meta {patch_nums, args, epoch}).

    ``.safetensors`` files hold a bare VAR state_dict under the official names (no metadata).
    """
    if Path(path).suffix == ".safetensors":
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            ckpt: Any = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a bad file, reported in one line
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({str(exc)[:160]})") from None
    else:
        ckpt = safe_load_pth(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint dict")
    meta: Dict[str, Any] = {"patch_nums": _patch_nums_from_meta(ckpt), "epoch": ckpt.get("epoch")}
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if isinstance(args, Mapping) and isinstance(args.get("product_quant"), int):
        meta["num_branches"] = int(args["product_quant"])
    trainer = ckpt.get("trainer")
    if isinstance(trainer, Mapping) and "var_wo_ddp" in trainer:
        sd = trainer["var_wo_ddp"]
        meta["has_tokenizer"] = "vae_local" in trainer
    elif "word_embed.weight" in ckpt:
        sd = ckpt
    else:
        keys = ", ".join(list(ckpt)[:6])
        raise CheckpointError(f"{path} has no VAR weights: expected trainer.var_wo_ddp or a bare VAR "
                              f"state_dict, found keys {keys}")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()
             if isinstance(v, torch.Tensor)}
    state = {k: v for k, v in state.items() if not DERIVED_KEYS.match(k)}
    return state, meta


def var_config_from_state_dict(sd: Mapping[str, torch.Tensor], patch_nums: Optional[Sequence[int]] = None,
                               num_branches: Optional[int] = None) -> VARModelConfig:
    """Infer the architecture from tensor shapes (width, depth, heads, Cvae, V, classes, shared AdaLN, p_drop)."""
    try:
        c, cvae = sd["word_embed.weight"].shape
        num_classes = sd["class_emb.weight"].shape[0] - 1
        L = sd["pos_1LC"].shape[1]
        num_scales = sd["lvl_embed.weight"].shape[0]
        V = sd["head.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a VAR state_dict: missing {exc.args[0]}") from None
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise CheckpointError("not a VAR state_dict: no blocks.* keys")
    heads_key = "blocks.0.attn.scale_mul_1H11"
    heads = sd[heads_key].shape[1] if heads_key in sd else depth
    hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
    if patch_nums is None:
        for cand in (MSVR_PATCH_NUMS, VAR_PATCH_NUMS):
            if len(cand) == num_scales and sum(p * p for p in cand) == L:
                patch_nums = cand
                break
    if patch_nums is None:
        raise CheckpointError(f"cannot tell the scale list of this VAR (L={L}, {num_scales} scales); "
                              "pass patch_nums (e.g. --patch-nums 1,1,2,3,3,4,5,6,8,11)")
    patch_nums = tuple(int(p) for p in patch_nums)
    if len(patch_nums) != num_scales or sum(p * p for p in patch_nums) != L:
        raise CheckpointError(f"patch_nums {patch_nums} do not fit the checkpoint (L={L}, {num_scales} scales)")
    branches = num_branches or (cvae // 32 if cvae % 32 == 0 else 1)  # upstream codebook_embed_dim = 32
    if branches < 1 or V % branches or cvae % branches:
        raise CheckpointError(f"cannot split V={V} / Cvae={cvae} into product branches")
    return VARModelConfig(
        depth=depth, width=int(c), num_heads=int(heads), mlp_ratio=hidden / c, num_classes=int(num_classes),
        patch_nums=patch_nums, codebook_size=V // branches, num_branches=branches, branch_dim=cvae // branches,
        shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=heads_key in sd,
        p_drop=0.15 if "empty_emb.weight" in sd else 0.0,
    )


def load_var_state_strict(model: VAR, sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                          assign: bool = False) -> None:
    """Load `sd` into `model`; CheckpointError naming missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)}≠{tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])}"
                         f"{', ...' if len(unexpected) > 4 else ''})")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)} ({', '.join(shapes[:3])})")
        raise CheckpointError(f"{source} does not fit this VAR: " + "; ".join(parts))
    model.load_state_dict(dict(sd), strict=True, assign=assign)


def save_var(directory: Union[str, Path], model: VAR, extra_config: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``directory/{model.safetensors, config.yaml}`` atomically; returns the directory.

    Same crash-safe protocol and refusals as :func:`xqtool.checkpoint.save_model_dir`: CheckpointError when a
    weight is NaN/Inf (nothing written), OutputError when `directory` exists and is not an xqtool VAR
    checkpoint or the disk is full (the previous checkpoint stays intact).
    """
    from xqtool.checkpoint import check_finite, save_safetensors

    directory = Path(directory)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    check_finite(sd, f"refusing to save {directory}")
    conf: Dict[str, Any] = {"format": "xqtool-var", "model": config_to_dict(model.config)}
    if extra_config:
        conf.update(dict(extra_config))
    recover_dir(directory)
    if directory.exists() and not (directory / "model.safetensors").is_file():
        raise OutputError(f"{directory} exists and is not an xqtool VAR checkpoint: refusing to replace it")
    with atomic_dir(directory, replace=True) as tmp:
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "xqtool-var"})
        (tmp / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False), encoding="utf-8")
    return directory


def read_var_config(directory: Union[str, Path]) -> Dict[str, Any]:
    """The ``config.yaml`` dict of an xqtool VAR directory."""
    from xqtool.checkpoint import one_line

    path = Path(directory) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path}: {one_line(exc)}") from None
    if data is None:
        raise CheckpointError(f"{path} is empty")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path} is not an xqtool VAR config (no 'model' section)")
    if isinstance(data.get("quant"), dict) and "codebook_size" in data["quant"]:
        raise CheckpointError(f"{directory} is a tokenizer checkpoint, not a VAR model (use it as `xqtool sample --tokenizer`)")
    return data


def load_var(path: Union[str, Path], map_location: str = "cpu", patch_nums: Optional[Sequence[int]] = None,
             device: Optional[str] = None, num_branches: Optional[int] = None) -> Tuple[VAR, Dict[str, Any]]:
    """Load a VAR from an xqtool directory or an official ``.pth`` → (model in eval mode, info dict).

    ``device="meta"`` builds the model on the meta device and assigns the tensors (fast layout checks).
    info: ``format`` ('xqtool' | 'official'), ``config`` (the whole config.yaml for xqtool dirs), ``patch_nums``.
    `path` may also be a registry name (``VAR-d17``) or ``hf://`` reference (:func:`xqtool.hub.resolve_checkpoint`).
    """
    from xqtool.checkpoint import check_finite, load_safetensors_checked
    from xqtool.hub import resolve_checkpoint

    if "://" not in str(path):
        recover_dir(Path(path))  # a crash mid-replacement left only the aside copy: restore it first
    path = resolve_checkpoint(path, kind="var")
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path} is a directory without model.safetensors (not an xqtool VAR checkpoint)")
        conf = read_var_config(path)
        try:
            cfg = var_model_config_from_dict(conf["model"])
        except ConfigError as exc:
            raise CheckpointError(f"{path}/config.yaml: {exc}") from None
        sd = load_safetensors_checked(path / "model.safetensors", device=map_location)
        info: Dict[str, Any] = {"format": "xqtool", "config": conf}
    elif path.is_file():
        sd, meta = load_official_var_state(path)
        check_finite(sd, str(path))
        cfg = var_config_from_state_dict(sd, patch_nums or meta.get("patch_nums"), num_branches or meta.get("num_branches"))
        info = {"format": "official", "meta": meta}
    else:
        raise CheckpointError(f"VAR checkpoint not found: {path}")
    if device == "meta":
        with torch.device("meta"):
            model = VAR(cfg)
        load_var_state_strict(model, sd, str(path), assign=True)
    else:
        model = VAR(cfg)
        load_var_state_strict(model, sd, str(path))
    info["patch_nums"] = model.patch_nums
    return model.eval(), info
