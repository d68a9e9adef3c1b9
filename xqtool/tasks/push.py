"""`xqtool push CKPT_DIR REPO_ID`: publish an xqtool checkpoint directory to the Hugging Face Hub.

Only safetensors weights travel: the directory must be an xqtool tokenizer or VAR checkpoint (``config.yaml`` +
``model.safetensors`` [+ ``ema.safetensors``]); any pickle-capable file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
``.pkl``, ``.pickle``, ``.npy``) makes the push fail before anything is uploaded. The files are staged in a temporary
folder with a generated model card (``README.md``: ``huggingface_hub.ModelCardData`` metadata; architecture from the
config; metrics from the newest evaluation report) and sent with ``HfApi.upload_folder`` in one commit. The pushed
repository loads back with ``--tokenizer hf://REPO_ID`` (or ``--var hf://REPO_ID``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from xqtool.errors import CheckpointError, ConfigError

PathLike = Union[str, "os.PathLike[str]"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npy", ".joblib")
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".md")
#: evaluation reports looked for in the checkpoint directory (newest wins), besides an explicit --report
REPORT_GLOBS = ("*report*.json", "train_state.json")


@dataclass
class PushResult:
    """What was (or would be) uploaded."""

    repo_id: str
    kind: str  # "tokenizer" | "var"
    files: List[str]
    report: Optional[str]
    commit_url: Optional[str]
    card: str


def _kind_and_config(ckpt_dir: Path) -> Tuple[str, Dict[str, Any]]:
    if not ckpt_dir.is_dir():
        if ckpt_dir.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{ckpt_dir} is a pickle-based file: push uploads safetensors only; export an xqtool "
                                  "checkpoint directory first (load_tokenizer + save_tokenizer)")
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint directory")
    missing = [f for f in ("config.yaml", "model.safetensors") if not (ckpt_dir / f).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt_dir} is not an xqtool checkpoint directory (no {', '.join(missing)})")
    from xqtool.checkpoints.safe_io import read_yaml_mapping

    conf = read_yaml_mapping(ckpt_dir / "config.yaml", empty="is not a YAML mapping")
    return ("var" if conf.get("format") == "xqtool-var" else "tokenizer"), conf


def _files_to_push(ckpt_dir: Path) -> List[Path]:
    """Every file under `ckpt_dir` (relative), refusing pickles; other non-text, non-safetensors files are refused too."""
    files: List[Path] = []
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(ckpt_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files / temp leftovers
        suffix = p.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p} is a pickle-capable file ({suffix}): push uploads safetensors only; "
                                  "move it out of the directory or convert it to .safetensors")
        if suffix != ".safetensors" and suffix not in TEXT_SUFFIXES:
            raise CheckpointError(f"{p}: only .safetensors weights and text files (json/yaml/txt/md) are pushed")
        files.append(rel)
    return files


def _check_safetensors(path: Path) -> int:
    """Number of tensors of a readable safetensors file; CheckpointError otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return len(list(fh.keys()))
    except Exception as exc:  # noqa: BLE001 - any failure is a bad file
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None


def find_report(ckpt_dir: Path, report: Optional[PathLike] = None) -> Optional[Path]:
    """`report` when given (must exist), else the newest ``*report*.json`` / ``train_state.json`` in `ckpt_dir`."""
    if report is not None:
        rp = Path(report)
        if not rp.is_file():
            raise ConfigError(f"evaluation report not found: {rp}")
        return rp
    found = [p for g in REPORT_GLOBS for p in ckpt_dir.glob(g) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _report_metrics(path: Optional[Path]) -> Tuple[Dict[str, float], str]:
    """(metric name → value, description of where they come from) of an eval-fid report or a train_state.json."""
    if path is None:
        return {}, ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read evaluation report {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"evaluation report {path} is not a JSON object")
    raw = data.get("metrics") if isinstance(data.get("metrics"), dict) else data.get("val")
    metrics = {str(k).split("/")[-1]: float(v) for k, v in (raw or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    where = f"{path.name}"
    if data.get("task"):
        counts = data.get("image_counts", {})
        n = counts.get("originals") or counts.get("gen")
        where += f" (xqtool eval-fid, task {data['task']}" + (f", {n} images" if n else "") + \
                 (f", data {data['data']}" if data.get("data") else "") + ")"
    elif "step" in data:
        where += f" (validation at training step {data['step']})"
    return metrics, where


def _architecture(kind: str, conf: Dict[str, Any]) -> List[Tuple[str, str]]:
    if kind == "var":
        from xqtool.config import var_model_config_from_dict

        m = var_model_config_from_dict(conf["model"])
        return [("model", f"VAR depth {m.depth}, width {m.embed_dim}, {m.heads} heads"),
                ("classes", str(m.num_classes)), ("scales", ",".join(map(str, m.patch_nums))),
                ("tokens per image", f"{m.num_branches} branches x {m.seq_len}"),
                ("codebook", f"{m.codebook_size} per branch")]
    from xqtool.config import load_tokenizer_config

    c = load_tokenizer_config(conf)
    return [("encoder / decoder", f"{c.model.enc_type} / {c.model.dec_type}"),
            ("image size", f"{c.model.image_size}x{c.model.image_size}"),
            ("quantizer", "LFQ" if c.quant.lfq else "VQ"),
            ("scales", ",".join(map(str, c.scales))),
            ("tokens per image", f"{c.quant.product_quant} branches x {c.tokens_per_branch} = "
                                 f"{c.quant.product_quant * c.tokens_per_branch}"),
            ("codebook", f"{c.quant.codebook_size} per branch, dim {c.quant.codebook_embed_dim}"),
            ("semantic guide", c.loss.semantic_guide)]


def model_card(repo_id: str, kind: str, conf: Dict[str, Any], files: List[str], report: Optional[Path],
               license: Optional[str] = None) -> str:
    """The README.md text: ``ModelCardData`` front matter + architecture, metrics and usage sections."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics, where = _report_metrics(report)
    tags = ["xqtool", "image-tokenizer" if kind == "tokenizer" else "image-generation",
            "xq-gan" if kind == "tokenizer" else "var"]
    data = ModelCardData(library_name="xqtool", license=license, tags=tags,
                         metrics=sorted(m for m in metrics if m in {"rfid", "fid", "psnr", "ssim", "lpips", "kid"}) or None)
    option = "--tokenizer" if kind == "tokenizer" else "--var"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"An xqtool {'XQ-GAN image tokenizer' if kind == 'tokenizer' else 'VAR class-conditional generator'} "
             "checkpoint (safetensors weights + xqtool `config.yaml`).", "", "## Architecture", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _architecture(kind, conf)]
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines += [f"From `{where}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation report was found next to the checkpoint.")
    lines += ["", "## Usage", "", "```bash", "pip install xqtool"]
    if kind == "tokenizer":
        lines.append(f"xqtool encode imgs/ -o tokens.npy {option} hf://{repo_id}")
    else:
        lines.append(f"xqtool sample {option} hf://{repo_id} --tokenizer TOKENIZER --classes 0,1 -o samples/")
    lines += ["```", "", "## Files", ""] + [f"- `{f}`" for f in files]
    lines += ["", f"Licence: {license or 'not stated by the uploader'}.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def push_checkpoint(ckpt_dir: PathLike, repo_id: str, *, report: Optional[PathLike] = None, private: bool = False,
                    revision: Optional[str] = None, commit_message: Optional[str] = None,
                    license: Optional[str] = None, token: Optional[str] = None, dry_run: bool = False) -> PushResult:
    """Upload the xqtool checkpoint directory `ckpt_dir` to the model repository `repo_id` (created when absent).

    Raises:
        CheckpointError: not an xqtool checkpoint directory, a pickle-capable or unknown file inside, unreadable
            safetensors.
        ConfigError: malformed `repo_id`, unreadable `report`.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"bad repository id '{repo_id}': {str(exc).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise ConfigError(f"bad repository id '{repo_id}': use OWNER/NAME")
    ckpt_dir = Path(ckpt_dir)
    kind, conf = _kind_and_config(ckpt_dir)
    rel_files = _files_to_push(ckpt_dir)
    for rel in rel_files:
        if rel.suffix == ".safetensors":
            _check_safetensors(ckpt_dir / rel)
    rep = find_report(ckpt_dir, report)
    names = [str(r) for r in rel_files if str(r) != "README.md"]
    if rep is not None and rep.parent.resolve() != ckpt_dir.resolve():
        names.append(rep.name)
    names = sorted(set(names)) + ["README.md"]
    card = model_card(repo_id, kind, conf, names, rep, license)
    result = PushResult(repo_id, kind, names, str(rep) if rep else None, None, card)
    if dry_run:
        return result
    with tempfile.TemporaryDirectory(prefix="xqtool-push-") as tmp:
        stage = Path(tmp)
        for rel in rel_files:
            if str(rel) == "README.md":
                continue
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt_dir / rel, stage / rel)
        if rep is not None and not (stage / rep.name).exists():
            shutil.copy2(rep, stage / rep.name)
        (stage / "README.md").write_text(card, encoding="utf-8")
        api = HfApi(token=token)
        from huggingface_hub import errors as hub_errors

        net_errors = tuple(c for c in (getattr(hub_errors, "HTTPError", None),) if isinstance(c, type))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), repo_type="model", revision=revision,
                                     commit_message=commit_message or f"xqtool push {ckpt_dir.name}")
        except (OSError, ValueError, RuntimeError, *net_errors) as exc:  # HfHubHTTPError, LocalTokenNotFoundError, offline ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"push to {repo_id} failed: {type(exc).__name__}: {first[:200]}") from None
    result.commit_url = str(getattr(info, "commit_url", info))
    return result
