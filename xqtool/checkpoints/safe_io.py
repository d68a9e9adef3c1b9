"""Safe reading and writing of weights: the one ``torch.load`` with its allow-list, checked safetensors, the one
strict state loader and the one atomic writer of an xqtool checkpoint directory.

Every weights file xqtool reads goes through :func:`safe_torch_load` (``.pt`` / ``.pth`` / ``.bin``: pickles
restricted to tensors, plain containers and :data:`ALLOWED_GLOBALS`) or :func:`load_safetensors_checked`
(stored digest and NaN/Inf checks). Errors are one-line :class:`~xqtool.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import yaml
from torch import Tensor, nn

from xqtool.errors import CheckpointError, OutputError
from xqtool.fsutil import atomic_dir, checksums_enabled, recover_dir

PathLike = Union[str, Path]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
#: safetensors metadata key of xqtool's content digest (:func:`tensors_digest`)
DIGEST_KEY = "xqtool_sha256"

#: The only classes a ``.pt``/``.pth`` pickle may name: official files store their ``args`` as an
#: ``argparse.Namespace`` whose values may be paths. Anything else (code execution) is refused.
ALLOWED_GLOBALS = (argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                   pathlib.PureWindowsPath)


def one_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception message (YAML and safetensors errors span several lines)."""
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:limit]


# ------------------------------------------------------------------------------------ torch.load


def safe_torch_load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with only :data:`ALLOWED_GLOBALS`; zip files are memory-mapped.

    Raises CheckpointError (one line naming `path`) when the file is missing, a directory, empty, not a
    PyTorch file (neither a ``torch.save`` zip nor a pickle), truncated, or references any other global.
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
    is_zip = magic.startswith(b"PK\x03\x04")
    if not (is_zip or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            # torch warns about pickle protocols other than 2 before failing (or not): the outcome says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        hint = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it references {hint.group(1)})" if hint else ""
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))  # torch's reason, after its boilerplate
        reason = detail.group(1).strip().rstrip(".") if detail else "unsupported content"
        raise CheckpointError(
            f"{path} cannot be loaded safely{what}: only tensors and plain containers are allowed ({reason[:120]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({msg[:160]})") from None


# ------------------------------------------------------------------------------------ finiteness and digests


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """CheckpointError naming the first floating-point tensor of `state` holding NaN or Inf.

    Used by every loader (a NaN weight silently turns encode into one token id per image) and by every
    writer (no save writes non-finite weights).
    """
    for name, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
            bad = count_non_finite(value)
            if bad:
                raise CheckpointError(
                    f"{source}: tensor '{name}' holds {bad} non-finite value(s) (NaN/Inf); the weights are unusable"
                )


def count_non_finite(t: Tensor) -> int:
    """Number of NaN/Inf entries of a floating tensor of any shape (numpy on the raw bits: fast on CPU, any float
    dtype; other devices count with torch)."""
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


# ------------------------------------------------------------------------------------ safetensors


def load_safetensors_checked(path: PathLike, device: str = "cpu", finite: bool = True) -> Dict[str, Tensor]:
    """Read a safetensors file; CheckpointError (one line naming the file) when it is missing, truncated,
    corrupt (xqtool's stored digest differs: a flipped bit) or, with `finite`, holds a NaN/Inf tensor (naming it).

    ``finite=False`` is for official files whose derived buffers hold ``-inf`` masks: the caller drops those and
    runs :func:`check_finite` on the rest."""
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
    if finite:
        check_finite(state, str(path))
    return state


def save_safetensors(state: Mapping[str, Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` with xqtool's content digest in the metadata (see :func:`tensors_digest`)."""
    from safetensors import torch as st_torch

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    st_torch.save_file(state, str(path), metadata={**(metadata or {}), DIGEST_KEY: tensors_digest(state)})


# ------------------------------------------------------------------------------------ strict state loading


def check_state_fits(own: Mapping[str, Tensor], state: Mapping[str, Tensor], lead: str) -> None:
    """CheckpointError when `state` does not have exactly the keys and shapes of `own` (a state_dict or shape table).

    The message is ``"{lead}: shape mismatch N (k: [..] in the file vs [..] in the model, ...); missing N (k, ...);
    unexpected N (k, ...)"`` with at most four names per kind, e.g. lead ``"best.pt does not fit the config"``.
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {list(state[k].shape)} in the file vs {list(own[k].shape)} in the model" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{label} {len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
             for label, names in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected))
             if names]
    if parts:
        raise CheckpointError(f"{lead}: " + "; ".join(parts))


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], lead: str, assign: bool = False) -> None:
    """Load `state` into `model` strictly (``assign=True`` for meta-device models); see :func:`check_state_fits`."""
    check_state_fits(model.state_dict(), state, lead)
    model.load_state_dict(dict(state), strict=True, assign=assign)


# ------------------------------------------------------------------------------------ xqtool checkpoint directories


def is_xqtool_dir(path: PathLike) -> bool:
    """True for a directory holding ``model.safetensors`` and ``config.yaml`` (tokenizer or VAR)."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


def locate_checkpoint(path: PathLike, kind: str) -> Path:
    """Local path of the checkpoint `path` names (`kind` 'tokenizer' | 'var'): a local file or directory (first
    restored if a crash mid-replacement left only its aside copy), a registry name or an ``hf://`` reference
    (:func:`xqtool.hub.resolve_checkpoint`, whose CheckpointError / ModelNotCachedError it raises)."""
    from xqtool.hub import resolve_checkpoint

    if "://" not in str(path):
        recover_dir(Path(path))
    return resolve_checkpoint(path, kind=kind)


def read_yaml_mapping(path: PathLike, empty: str = "is empty",
                      not_mapping: str = "is not a YAML mapping") -> Dict[str, Any]:
    """The mapping in the YAML file `path`; CheckpointError ``"{path} {empty}"`` / ``"{path} {not_mapping}"`` /
    ``"cannot read {path}: ..."`` (unreadable or malformed) / ``"{path} is missing"``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path}: {one_line(exc)}") from None
    if data is None:
        raise CheckpointError(f"{path} {empty}")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} {not_mapping}")
    return data


def write_checkpoint_dir(
    directory: PathLike,
    weights: Mapping[str, Mapping[str, Tensor]],
    config_text: str,
    metadata: Mapping[str, str],
    kind: str = "",
    extra_files: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write an xqtool checkpoint directory atomically: each ``weights`` entry (file name → state_dict) as checked
    safetensors with `metadata`, ``config.yaml`` = `config_text`, then `extra_files` (name → text).

    Crash-safe: written as a temporary sibling, then swapped in (:func:`xqtool.fsutil.atomic_dir`), so a
    complete checkpoint exists at every instant. Raises CheckpointError, before writing anything, when a
    weight is NaN/Inf (naming the tensor); OutputError when `directory` exists and is not an xqtool checkpoint
    (`kind`, e.g. ``"VAR "``, names what was expected) or the disk is full (earlier checkpoints intact).
    """
    directory = Path(directory)
    for name, state in weights.items():
        check_finite(state, f"refusing to save {directory}" + (" (EMA)" if name == EMA_FILE else ""))
    recover_dir(directory)
    if directory.exists() and not is_xqtool_dir(directory):
        raise OutputError(f"{directory} exists and is not an xqtool {kind}checkpoint: refusing to replace it")
    with atomic_dir(directory, replace=True) as tmp:
        for name, state in weights.items():
            save_safetensors(state, tmp / name, metadata=dict(metadata))
        (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory
