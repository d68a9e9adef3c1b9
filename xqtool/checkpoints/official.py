"""Official checkpoint import: one key map per model family, plus the architecture read from the tensors.

* Tokenizer (XQ-GAN ``VQModel``): ``torch.save`` dicts with ``model`` / ``ema`` / ``optimizer`` / ``discriminator`` /
  ``optimizer_disc`` / ``steps`` / ``args`` (an ``argparse.Namespace``). :func:`map_official_tokenizer_keys` drops the
  frozen teachers and recomputed buffers, merges peft-LoRA-wrapped backbones and renames the quantizers.
* VAR (``ar-ckpt-last.pth``, spec var.md §5): ``ckpt['trainer']['var_wo_ddp']`` or a bare VAR state_dict
  (FoundationVision's ``var_dXX.pth``). :func:`map_official_var_keys` keeps names 1:1 and drops the derived buffers
  ``lvl_1L``, ``attn_bias_for_masking`` and ``*.zero_k_bias`` (recomputed). The scale list comes from the file
  (``trainer.config.patch_nums`` / ``args.pn``), the caller, or the MSVR default when L matches.

Files are read only through :func:`xqtool.checkpoints.safe_io.safe_torch_load` (nothing in them can run code).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from xqtool.checkpoints.safe_io import PathLike, check_finite, load_safetensors_checked, safe_torch_load
from xqtool.config import TokenizerConfig
from xqtool.config import MSVR_PATCH_NUMS, VAR_PATCH_NUMS, VARModelConfig
from xqtool.errors import CheckpointError

# Prefixes of frozen teachers stored inside official tokenizer checkpoints (not needed for inference).
TEACHER_PREFIXES = ("semantic_model.", "detail_model.")
# Persistent buffers of the reference tokenizer that xqtool recomputes.
RECOMPUTED_KEYS = re.compile(r"(^|\.)lvl1LC$")
# Derived buffers of the reference VAR that xqtool recomputes.
DERIVED_KEYS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")


def official_args(args: Any) -> Dict[str, Any]:
    """The official ``args`` entry (``argparse.Namespace`` or dict) as a dict; {} for anything else."""
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def _strip_module(key: str) -> str:
    """``module.X`` (a DDP-wrapped model's state_dict) → ``X``."""
    return key[len("module."):] if key.startswith("module.") else key


# ------------------------------------------------------------------------------------ tokenizer


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
    """Official XQ-GAN ``VQModel`` state_dict → xqtool ``XQTokenizer`` names (the tokenizer key map).

    Raises CheckpointError when a LoRA-wrapped layer lacks its A or B matrix.
    """
    state = dict(state)
    if any(".lora_A." in k or ".base_model.model." in k for k in state):
        state = _merge_lora(state)
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(TEACHER_PREFIXES) or RECOMPUTED_KEYS.search(key):
            continue
        key = _strip_module(key)
        if key.startswith("quantizes."):
            key = "quantizer." + key
        elif key.startswith("quantize."):
            key = "quantizer.quantizes.0." + key[len("quantize."):]
        out[key] = value
    return out


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
    return state, official_args(blob.get("args"))


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


# ------------------------------------------------------------------------------------ VAR


def map_official_var_keys(state: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Official VAR state_dict → xqtool ``VAR`` names (the VAR key map): names 1:1 without ``module.``; non-tensor
    entries and the derived buffers (:data:`DERIVED_KEYS`) dropped."""
    out = {_strip_module(k): v for k, v in state.items() if isinstance(v, Tensor)}
    return {k: v for k, v in out.items() if not DERIVED_KEYS.match(k)}


def _patch_nums_from_meta(ckpt: Mapping[str, Any]) -> Optional[Tuple[int, ...]]:
    trainer = ckpt.get("trainer")
    if isinstance(trainer, Mapping):
        conf = trainer.get("config")
        if isinstance(conf, Mapping) and conf.get("patch_nums"):
            return tuple(int(p) for p in conf["patch_nums"])
    args = official_args(ckpt.get("args"))
    if args.get("patch_nums"):
        return tuple(int(p) for p in args["patch_nums"])
    pn = args.get("pn")
    if isinstance(pn, str) and re.fullmatch(r"\d+(_\d+)*", pn) and "_" in pn:
        return tuple(int(p) for p in pn.split("_"))
    return None


def read_official_var(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read an official VAR file → (VAR state_dict without derived buffers, meta {patch_nums, epoch, ...}).

    ``.safetensors`` files hold a bare VAR state_dict under the official names (no metadata). Raises
    CheckpointError for missing, unreadable, unsafe or non-VAR files and NaN/Inf weights.
    """
    if Path(path).suffix == ".safetensors":
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        ckpt: Any = load_safetensors_checked(path, finite=False)  # derived -inf masks are dropped below
    else:
        ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint dict")
    meta: Dict[str, Any] = {"patch_nums": _patch_nums_from_meta(ckpt), "epoch": ckpt.get("epoch")}
    args = official_args(ckpt.get("args"))
    if isinstance(args.get("product_quant"), int):
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
    state = map_official_var_keys(sd)
    check_finite(state, str(path))
    return state, meta


def var_config_from_state_dict(sd: Mapping[str, Tensor], patch_nums: Optional[Sequence[int]] = None,
                               num_branches: Optional[int] = None) -> VARModelConfig:
    """Infer the architecture from tensor shapes (width, depth, heads, Cvae, V, classes, shared AdaLN, p_drop).

    Raises CheckpointError when `sd` is not a VAR state_dict or the scale list / branch split cannot be told.
    """
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
