"""Range checks of every numeric CLI option, devices, output paths and ``--resume`` targets.

The CLI calls :func:`validate_command` for each command before its body runs (so before any model or
data is loaded). Rules are keyed by the command's *parameter name* (the Python identifier), and the error
names the option as the user typed it (taken from the Click declaration at run time), so renaming an
option keeps its rule. Every failure is one line (:class:`~xqtool.errors.ConfigError`, exit code 2).

Documented choices:

* ``--temperature`` must be > 0: temperature 0 is refused (use ``--top-k 1`` for greedy sampling).
* Non-finite floats (nan, inf) are refused for every float option.
* ``--top-k 0`` and ``--top-p 0`` mean "off"; ``--top-p`` must lie in [0, 1].
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from xqtool.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Allowed numeric interval; ``None`` bound = unbounded; ``lo_open``/``hi_open`` exclude the bound."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def text(self) -> str:
        """Human-readable interval, e.g. '>= 1', '> 0', 'in [0, 1]'."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "a finite number"

    def ok(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True


POSITIVE = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1)

#: Rules by parameter name, for every command that has the parameter.
RULES: Dict[str, Range] = {
    "batch_size": POSITIVE,
    "num_workers": NON_NEGATIVE,
    "unit_size": POSITIVE,
    "maxcount": POSITIVE,
    "quality": Range(lo=1, hi=100),
    "nodes": POSITIVE,
    "workers": POSITIVE,
    "reader_workers": POSITIVE,
    "cfg": NON_NEGATIVE,
    "top_k": Range(lo=0, hint="0 = off"),
    "top_p": Range(lo=0, hi=1, hint="0 = off"),
    "temperature": Range(lo=0, lo_open=True, hint="use --top-k 1 for greedy sampling"),
    "per_class": POSITIVE,
    "val_per_class": NON_NEGATIVE,
    "num_samples": POSITIVE,
    "seed": NON_NEGATIVE,
    "max_steps": POSITIVE,
    "max_images": Range(lo=2),
    "image_size": Range(lo=8),
    "size": Range(lo=8, hi=512),
    "epochs": POSITIVE,
    "lr": Range(lo=0, lo_open=True),
    "weight_decay": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "warmup_lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "decay_rate": Range(lo=0, hi=1, lo_open=True),
    "num_classes": Range(lo=2),
    "max_train_images": Range(lo=2),
    "max_val_images": POSITIVE,
    "lora_rank": POSITIVE,
}

#: Per-command exceptions: (command, parameter) -> rule.
COMMAND_RULES: Dict[Tuple[str, str], Range] = {
    ("probe", "batch_size"): Range(lo=2),
}

#: Output parameters: name -> 'dir' (a folder is created), 'file', or 'any' (file or folder by suffix).
OUTPUTS: Dict[str, str] = {
    "output": "any",
    "out_dir": "dir",
    "out": "dir",
    "output_dir": "dir",
    "save_recon": "dir",
    "stats_dir": "dir",
    "npz": "file",
    "grid": "file",
    "report": "file",
    "legacy_out": "dir",
}

#: Per-command kind of ``-o/--output`` (the one vocabulary gives every command the same option name).
COMMAND_OUTPUTS: Dict[str, str] = {
    "sample": "dir", "decode": "dir", "make-shards": "dir", "demo-images": "dir", "probe": "dir",
    "train-tokenizer": "dir", "finetune": "dir", "train-var": "dir", "eval-fid": "file", "make-fid-stats": "file",
}

_DEVICE = re.compile(r"^(cpu|mps|cuda|cuda:\d+|xpu|xpu:\d+)$")


def check_number(label: str, value: Any, rule: Range) -> None:
    """ConfigError unless `value` is a finite number inside `rule` (None passes: option not given)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, got {value}")
        if not rule.ok(float(value)):
            hint = f" ({rule.hint})" if rule.hint else ""
            raise ConfigError(f"{label} must be {rule.text()}{hint}, got {value:g}")


def check_device(label: str, device: Optional[str]) -> None:
    """ConfigError for an unknown device string or a CUDA device this machine does not have."""
    if device is None or device == "":
        return
    d = str(device).strip().lower()
    if not _DEVICE.match(d):
        raise ConfigError(f"{label} must be cpu, cuda, cuda:N or mps, got {device!r}")
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{label} {device}: no CUDA GPU is available on this machine (use --device cpu)")
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{label} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d == "mps":
        import torch

        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{label} mps: Apple MPS is not available on this machine")


def check_output(label: str, path: Optional[os.PathLike], kind: str = "any") -> None:
    """ConfigError when `path` cannot be written: it lies under a file, is a file where a folder is
    needed (or a folder where a file is), or its nearest existing folder is read-only."""
    if path is None or str(path) in ("", "-"):
        return
    p = Path(path).expanduser()
    if kind == "dir" and p.is_file():
        raise ConfigError(f"{label} {p}: is an existing file, expected a folder")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{label} {p}: is an existing folder, expected a file name")
    parent = p if p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{label} {p}: cannot be created under {parent}, which is a file")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{label} {p}: folder {parent} is read-only")


def _trainer_of(state_dir: Path) -> Optional[str]:
    """'var' or 'tokenizer' for a training-state directory, None when unknown."""
    import json

    try:
        state = json.loads((state_dir / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(state, dict):
        if state.get("trainer") in ("var", "tokenizer"):
            return str(state["trainer"])
        if "best_step" in state or "batch_in_epoch" in state:
            return "tokenizer"
        if "epoch_micro" in state:
            return "var"
    return None


def check_resume(label: str, resume: Optional[str], trainer: str) -> None:
    """ConfigError when ``--resume PATH`` points at a run or state of the other trainer."""
    if not resume or resume == "auto":
        return
    path = Path(resume)
    states = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else [path]
    for state in reversed(states):
        found = _trainer_of(state)
        if found is not None:
            if found != trainer:
                other = {"var": "train-var", "tokenizer": "train-tokenizer/finetune"}[found]
                raise ConfigError(f"{label} {resume}: this is a {other} run, not a {trainer} run")
            return
    if (path / "var-last").is_dir() and trainer != "var":
        raise ConfigError(f"{label} {resume}: this is a train-var run, not a {trainer} run")


_RESUME_TRAINER = {"train-var": "var", "train-tokenizer": "tokenizer", "finetune": "tokenizer"}


def validate_command(command: str, values: Mapping[str, Any], labels: Optional[Mapping[str, str]] = None) -> None:
    """Check the parsed parameters of `command` (name -> value) before it runs.

    `labels` maps parameter names to the option string shown in errors (default ``--name-with-dashes``).
    Raises ConfigError (one line) for the first bad value.
    """
    labels = labels or {}

    def label(name: str) -> str:
        return labels.get(name) or "--" + name.replace("_", "-")

    for name, value in values.items():
        rule = COMMAND_RULES.get((command, name)) or RULES.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label(name)} must be a finite number, got {value}")
        if rule is not None:
            check_number(label(name), value, rule)
    for name in ("device",):
        if name in values:
            check_device(label(name), values[name])
    for name, kind in OUTPUTS.items():
        if name in values and isinstance(values[name], (str, os.PathLike)) and values[name] is not None:
            if command == "encode" and name == "output":
                kind = "file" if str(values[name]).endswith(".npy") else "dir"
            elif name == "output":
                kind = COMMAND_OUTPUTS.get(command, kind)
            check_output(label(name), values[name], kind)
    if "resume" in values and command in _RESUME_TRAINER:
        check_resume(label("resume"), values["resume"], _RESUME_TRAINER[command])
