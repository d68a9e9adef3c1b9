"""`xqtool inspect`: what a config or checkpoint describes, without building teachers or touching the network."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

from xqtool.checkpoints.official import (TEACHER_PREFIXES, fit_vit_config, map_official_tokenizer_keys,
                                         official_args)
from xqtool.checkpoints.safe_io import CONFIG_FILE, EMA_FILE, is_xqtool_dir, one_line, read_yaml_mapping, safe_torch_load
from xqtool.checkpoints.tokenizer import read_config_yaml
from xqtool.fsutil import recover_dir
from xqtool.config import TokenizerConfig, config_hash, ignored_settings, load_tokenizer_config, tokenizer_config_from_args
from xqtool.errors import CheckpointError, ConfigError
from xqtool.metrics import count_parameters


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
    args = official_args(blob.get("args"))
    warnings = []
    state = blob.get("ema") or blob.get("model") or {}
    teacher = sum(v.numel() for k, v in state.items() if k.startswith(TEACHER_PREFIXES))
    if teacher:
        warnings.append(f"checkpoint holds {teacher:,} frozen teacher parameters (dropped for inference)")
    if "ema" not in blob:
        warnings.append("no EMA weights in the checkpoint; the raw 'model' weights will be used")
    if "steps" in blob:
        warnings.append(f"trained for {int(blob['steps']):,} steps")
    return args, warnings, state


def _check_yaml_file(path: Path) -> None:
    """CheckpointError in one line for an empty, unreadable or non-mapping YAML file (never a default config)."""
    read_yaml_mapping(path, empty="is empty: nothing to inspect", not_mapping="is not a YAML mapping of config keys")


def _load_cfg(path: Path, overrides: Optional[Iterable[str]]) -> TokenizerConfig:
    """The file's config with `overrides`; ConfigError names the file only when the file itself is at fault."""
    overrides = list(overrides or ())
    try:
        return load_tokenizer_config(path, overrides)
    except ConfigError as exc:
        if overrides:
            try:
                load_tokenizer_config(path)
            except ConfigError:
                pass
            else:
                raise  # the file is fine: a bad --set, reported as train-tokenizer reports it
        raise ConfigError(f"{path}: {one_line(exc, 300)}") from None


def inspect_target(target: str, overrides: Optional[Iterable[str]] = None) -> InspectReport:
    """Resolve the config of a YAML file, xqtool checkpoint dir or official `.pt` and describe it."""
    from xqtool.models.tokenizer import build_tokenizer

    path = Path(target)
    warnings: List[str] = []
    if not path.exists():
        raise CheckpointError(f"not found: {path}")
    if path.is_dir():
        recover_dir(path)
        if not is_xqtool_dir(path):
            raise CheckpointError(f"{path} is not an xqtool checkpoint directory (needs model.safetensors and config.yaml)")
        if read_config_yaml(path).get("format") == "xqtool-var":
            raise CheckpointError(f"{path} is a VAR generator checkpoint, not a tokenizer")
        cfg = _load_cfg(path / CONFIG_FILE, overrides)
        kind = "xqtool checkpoint"
        if not (path / EMA_FILE).is_file():
            warnings.append("no ema.safetensors: the raw weights will be used")
    elif path.suffix in (".yaml", ".yml"):
        _check_yaml_file(path)
        cfg = _load_cfg(path, overrides)
        kind = "config"
    else:
        args, warnings, state = _official_info(path)
        if not args:
            raise CheckpointError(f"{path} carries no config ('args'); inspect its YAML config instead")
        cfg = fit_vit_config(tokenizer_config_from_args(args), map_official_tokenizer_keys(state), str(path))
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
    warnings.extend(ignored_settings(cfg))
    if cfg.loss.semantic_guide != "none" and not cfg.loss.semantic_weights:
        warnings.append(
            f"training needs {cfg.loss.semantic_guide} teacher weights (loss.semantic_weights or env var); "
            "inference does not"
        )
    if cfg.model.enc_type == "dinov2" and not cfg.model.encoder_weights:
        warnings.append("training from scratch starts the ViT from random init unless model.encoder_weights is set")
    return InspectReport(str(path), kind, cfg, config_hash(cfg), params, rows, warnings)


# ============================================================================ every artefact

#: Kinds :func:`inspect_any` recognises (the ``kind`` field of its report).
KINDS = (
    "tokenizer config", "tokenizer checkpoint", "official tokenizer checkpoint",
    "VAR config", "VAR checkpoint", "official VAR checkpoint",
    "token file", "token shards", "training state", "image source",
)
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_VAR_MODEL_KEYS = ("depth", "patch_nums", "num_classes", "width", "num_heads", "cond_drop_rate")
_MAX_SIZE_PROBES = 2000


def inspect_any(target: str, overrides: Optional[Iterable[str]] = None, full: bool = False) -> Dict[str, Any]:
    """Recognise and summarise any artefact xqtool reads or writes; returns a JSON-able report.

    Report fields: ``kind`` (one of :data:`KINDS`), ``source``, ``facts`` (ordered name -> value),
    optional ``parameters`` (part -> count), ``tokens`` (per-scale rows), ``histogram`` (class id -> rows),
    ``class_names`` (class id -> name, where the source names its classes),
    ``config`` (resolved config sections), ``warnings``. Models are built on the meta device: no weights
    are allocated, nothing is downloaded. Raises CheckpointError / DataError / TokenError / ConfigError
    (one line) for what it cannot read.
    """
    path = Path(target)
    if not path.exists():
        from xqtool.data.sources import looks_like_shards
        from xqtool.hub import parse_reference, resolve_checkpoint

        if looks_like_shards(target):
            return _inspect_images(target)
        if parse_reference(target) is None:
            raise CheckpointError(f"not found: {path}")
        path = resolve_checkpoint(target)  # registry name or hf:// reference (Hub cache; offline-aware)
    if path.is_dir():
        from xqtool.checkpoints.training_state import STATE_DIR, STATE_FILE, list_states

        if (path / STATE_FILE).is_file():
            return _inspect_state(path, path.parent.parent if path.parent.name == STATE_DIR else None)
        if list_states(path):
            return _inspect_state(list_states(path)[-1], path)
        if (path / "model.safetensors").is_file() and (path / CONFIG_FILE).is_file():
            if _is_var_dir(path):
                return _inspect_var_ckpt(path, "VAR checkpoint")
            return _tokenizer_report(path, overrides, full)
        if (path / "manifest.json").is_file():
            return _inspect_tokens(path, "token shards")
        return _inspect_images(str(path))
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        if _is_var_yaml(path):
            return _inspect_var_config(path, overrides, full)
        return _tokenizer_report(path, overrides, full)
    if suffix == ".npy":
        return _inspect_tokens(path, "token file")
    if suffix in _TORCH_SUFFIXES:
        blob = safe_torch_load(path)
        if isinstance(blob, dict) and ("trainer" in blob or "word_embed.weight" in blob):
            return _inspect_var_ckpt(path, "official VAR checkpoint")
        return _tokenizer_report(path, overrides, full)
    return _inspect_images(str(path))


def _is_var_dir(path: Path) -> bool:
    import yaml

    try:
        conf = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except Exception:  # noqa: BLE001 - the tokenizer loader reports unreadable configs
        return False
    return isinstance(conf, dict) and (conf.get("format") == "xqtool-var" or (
        isinstance(conf.get("model"), dict) and "depth" in conf["model"] and "quant" not in conf))


def _is_var_yaml(path: Path) -> bool:
    import yaml

    try:
        conf = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except Exception:  # noqa: BLE001 - the config loader reports the YAML error
        return False
    model = conf.get("model") if isinstance(conf, dict) else None
    return isinstance(model, dict) and "quant" not in conf and any(k in model for k in _VAR_MODEL_KEYS)


def _tokenizer_report(path: Path, overrides: Optional[Iterable[str]], full: bool) -> Dict[str, Any]:
    from xqtool.config import config_to_dict

    rep = inspect_target(str(path), overrides)
    kind = {"config": "tokenizer config", "xqtool checkpoint": "tokenizer checkpoint",
            "official checkpoint": "official tokenizer checkpoint"}[rep.kind]
    cfg = rep.config
    tree = config_to_dict(cfg)
    P = cfg.quant.product_quant
    facts = {
        "config hash": rep.config_hash,
        "image size": cfg.model.image_size,
        "encoder": cfg.model.enc_type,
        "codebook dim": cfg.quant.codebook_embed_dim,
        "codebook size": cfg.quant.codebook_size,
        "branches (P)": P,
        "scales": list(cfg.scales),
        "tokens per image": P * cfg.tokens_per_branch,
    }
    return {"kind": kind, "source": str(path), "facts": {k: v for k, v in facts.items() if v is not None},
            "parameters": rep.parameters, "tokens": rep.tokens,
            "config": tree if full else {k: tree[k] for k in ("model", "quant")}, "warnings": rep.warnings}


def _var_parts(model: torch.nn.Module) -> Dict[str, int]:
    """Parameters of a VAR per part (names of spec var.md §2)."""
    groups = {"embeddings (word, class, position, level)": ("word_embed", "class_emb", "pos_start", "pos_1LC",
                                                            "lvl_embed", "empty_emb"),
              "transformer blocks": ("blocks.",), "shared AdaLN": ("shared_ada_lin",), "head": ("head",)}
    out: Dict[str, int] = {}
    for part, prefixes in groups.items():
        n = count_parameters(model, prefixes)
        if n:
            out[part] = n
    out["total"] = count_parameters(model)
    return out


def _var_facts(model: Any) -> Dict[str, Any]:
    c = model.config
    return {"depth": c.depth, "width": c.embed_dim, "heads": c.heads, "classes": c.num_classes,
            "scales (patch_nums)": list(c.patch_nums), "tokens per branch (L)": int(sum(p * p for p in c.patch_nums)),
            "branches (P)": c.num_branches, "codebook size": c.codebook_size, "branch dim": c.branch_dim}


def _inspect_var_config(path: Path, overrides: Optional[Iterable[str]], full: bool) -> Dict[str, Any]:
    from xqtool.config import config_to_dict, load_var_config
    from xqtool.models.var import build_var

    cfg = load_var_config(path, list(overrides or []))
    model = build_var(cfg.model, device="meta")
    t = cfg.train
    facts = _var_facts(model)
    facts.update({"global batch": t.global_batch_size, "epochs": t.epochs,
                  "peak lr": t.tblr * t.global_batch_size / 256, "precision": t.mixed_precision,
                  "tokens": cfg.data.tokens, "tokenizer": cfg.data.tokenizer})
    warnings = []
    if not cfg.data.tokenizer:
        warnings.append("no tokenizer set: train-var needs --tokenizer/-t")
    if not cfg.data.tokens and not cfg.data.images:
        warnings.append("no data set: train-var needs --tokens or --images")
    tree = config_to_dict(cfg)
    return {"kind": "VAR config", "source": str(path), "facts": facts, "parameters": _var_parts(model),
            "config": tree if full else {"model": tree["model"]}, "warnings": warnings}


def _inspect_var_ckpt(path: Path, kind: str) -> Dict[str, Any]:
    from xqtool.checkpoints import load_var

    model, info = load_var(path, device="meta")
    facts = _var_facts(model)
    warnings: List[str] = []
    if info["format"] == "xqtool":
        conf = info.get("config") or {}
        for key in ("step",):
            if key in conf:
                facts[key] = conf[key]
        tok = (conf.get("tokenizer") or {}).get("path")
        if tok:
            facts["tokenizer"] = tok
        if conf.get("fingerprint"):
            facts["fingerprint"] = conf["fingerprint"]
        seen = conf.get("classes_seen")
        if seen is not None:
            facts["classes seen in training"] = f"{len(seen)} of {model.config.num_classes}"
        else:
            warnings.append("the checkpoint does not record which classes occurred in training")
    else:
        meta = info.get("meta") or {}
        if meta.get("epoch") is not None:
            facts["epoch"] = meta["epoch"]
        if meta.get("has_tokenizer"):
            facts["bundled tokenizer"] = "yes (trainer.vae_local, ignored)"
    return {"kind": kind, "source": str(path), "facts": facts, "parameters": _var_parts(model),
            "warnings": warnings}


def _manifest_raw(path: Path, kind: str) -> Dict[str, Any]:
    import json

    from xqtool.data.tokens import manifest_path

    mp = manifest_path(path)
    try:
        return json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        from xqtool.errors import TokenError

        raise TokenError(f"cannot read the token manifest {mp}: {exc}") from None


def _histogram(labels: Iterable[int]) -> Dict[str, int]:
    from collections import Counter

    counts = Counter(int(x) for x in labels)
    return {str(k): counts[k] for k in sorted(counts)}


def _class_names(hist: Dict[str, int], classes: Optional[List[str]]) -> Dict[str, str]:
    """Class id → name for the ids in `hist` that `classes` (index = id) names; {} without names."""
    names = list(classes or [])
    return {k: str(names[int(k)]) for k in hist if 0 <= int(k) < len(names)}


def _inspect_tokens(path: Path, kind: str) -> Dict[str, Any]:
    import numpy as np

    from xqtool.data.tokens import TokenManifest

    raw = _manifest_raw(path, kind)
    manifest = TokenManifest.from_dict(raw, where=str(path))
    warnings: List[str] = []
    labels: List[int] = list(manifest.labels or [])
    if kind == "token file":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            from xqtool.errors import TokenError

            raise TokenError(f"cannot read token array {path}: {exc}") from None
        rows, shape = int(arr.shape[0]), list(arr.shape)
        if tuple(arr.shape[1:]) != (manifest.num_branches, manifest.tokens_per_branch):
            warnings.append(f"array shape {shape} does not match the manifest's [N, {manifest.num_branches}, "
                            f"{manifest.tokens_per_branch}]")
    else:
        rows, shape = int(manifest.count), [int(manifest.count), manifest.num_branches, manifest.tokens_per_branch]
        if not labels:
            from xqtool.data.tokens import _iter_token_samples, _token_shards

            for url in _token_shards(path, manifest):
                labels.extend(int(s["label"]) for s in _iter_token_samples(url))
    facts: Dict[str, Any] = {
        "rows": rows, "shape [N, P, L]": shape, "branches (P)": manifest.num_branches,
        "tokens per branch (L)": manifest.tokens_per_branch, "codebook size": manifest.codebook_size,
        "scales": manifest.scales, "image size": manifest.image_size, "dtype": manifest.dtype,
    }
    skip = {"keys", "paths", "labels", "shards", "tokenizer_config", "classes", "scales", "num_branches",
            "tokens_per_branch", "codebook_size", "image_size", "dtype", "count"}
    for k, v in raw.items():
        if k not in skip and not isinstance(v, (list, dict)):
            facts[k.replace("_", " ")] = v
        elif k not in skip and isinstance(v, dict) and k.endswith("fingerprint"):
            facts[k.replace("_", " ")] = v
    if kind == "token shards":
        facts["shard files"] = len(manifest.shards)
    if manifest.classes:
        facts["class names"] = len(manifest.classes)
    if not raw.get("fingerprint") and not raw.get("weights_fingerprint"):
        warnings.append("no tokenizer weights fingerprint in the manifest (written by an older xqtool)")
    hist = _histogram(labels)
    return {"kind": kind, "source": str(path), "facts": facts, "histogram": hist,
            "class_names": _class_names(hist, manifest.classes), "warnings": warnings}


def _inspect_state(state_dir: Path, run_dir: Optional[Path]) -> Dict[str, Any]:
    import json

    from xqtool.checkpoints.training_state import read_state

    state = read_state(state_dir)
    facts: Dict[str, Any] = {"state folder": str(state_dir)}
    for key in ("step", "epoch", "batch_in_epoch", "samples_seen", "world_size", "best_value", "best_step"):
        if state.get(key) is not None:
            facts[key.replace("_", " ")] = state[key]
    if "world size" not in facts:
        ranks = sorted(state_dir.glob("random_states_*.pkl"))
        if ranks:
            facts["world size"] = len(ranks)
    warnings: List[str] = []
    run = run_dir if run_dir is not None else state_dir.parent.parent
    gb = None
    conf_path = run / CONFIG_FILE
    if conf_path.is_file():
        import yaml

        try:
            conf = yaml.safe_load(conf_path.read_text(encoding="utf-8")) or {}
            gb = int((conf.get("train") or {}).get("global_batch_size") or 0) or None
        except Exception:  # noqa: BLE001 - facts only
            gb = None
    if "samples seen" not in facts and gb and "step" in facts:
        facts["samples seen"] = int(facts["step"]) * gb
        facts["global batch"] = gb
    metrics = state.get("last_metrics") or state.get("val") or {}
    summary = run / "summary.json"
    if not metrics and summary.is_file():
        try:
            metrics = json.loads(summary.read_text(encoding="utf-8")).get("last_val") or {}
        except (OSError, ValueError):
            warnings.append(f"cannot read {summary}")
    for k, v in dict(metrics).items():
        facts[f"last {k}"] = v
    if run_dir is not None:
        facts["run folder"] = str(run_dir)
        from xqtool.checkpoints.training_state import list_states

        facts["states"] = [p.name for p in list_states(run_dir)]
    return {"kind": "training state", "source": str(state_dir), "facts": facts, "warnings": warnings}


def _inspect_images(source: str) -> Dict[str, Any]:
    from collections import Counter

    from PIL import Image

    from xqtool.data.sources import resolve_source

    spec = resolve_source(source)
    facts: Dict[str, Any] = {"source kind": spec.kind, "description": spec.description}
    warnings: List[str] = []
    labels: List[int] = []
    if spec.kind == "shards":
        facts["shards"] = len(spec.urls)
        return {"kind": "image source", "source": source, "facts": facts, "warnings": warnings}
    facts["images"] = len(spec.items)
    if spec.classes:
        facts["classes"] = len(spec.classes)
    sizes: Counter = Counter()
    bad: Dict[str, str] = {}
    for i, item in enumerate(spec.items):
        labels.append(int(item.label))
        if item.error:
            bad[item.path] = item.error
            continue
        if i >= _MAX_SIZE_PROBES:
            continue
        try:
            with Image.open(item.path) as im:
                sizes[f"{im.size[0]}x{im.size[1]}"] += 1
                im.verify()
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not raised
            bad[item.path] = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    probed = min(len(spec.items), _MAX_SIZE_PROBES)
    facts["sizes"] = dict(sizes.most_common(10))
    facts["bad files"] = len(bad)
    if probed < len(spec.items):
        warnings.append(f"sizes and readability checked on the first {probed} of {len(spec.items)} files")
    for name, reason in list(sorted(bad.items()))[:5]:
        warnings.append(f"bad file {name}: {reason}")
    hist = _histogram(x for x in labels if x >= 0)
    return {"kind": "image source", "source": source, "facts": facts, "histogram": hist,
            "class_names": _class_names(hist, spec.classes), "warnings": warnings}
