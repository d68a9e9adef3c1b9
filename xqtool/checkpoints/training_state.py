"""Training-state directories shared by every trainer: safe save/load, listing, `--resume`, data position.

Layout: ``RUN/checkpoints/step-NNNNNNN/`` holds one ``NAME.safetensors`` per component (models,
optimizers, schedulers, scaler, EMA, trainer position ...), one ``rng-RANK.safetensors`` per process and
``trainer_state.json``. Non-tensor parts of a component's ``state_dict`` (ints, floats, lists, dict keys)
travel as JSON in the safetensors metadata; nothing is ever unpickled, so a planted file cannot run code
(a state is read with safetensors and ``json`` only). ``trainer_state.json`` is written last, with the
size and SHA-256 of every file, inside a temporary directory that is then renamed: a directory with the
JSON is complete, and a damaged one (truncated, missing or altered file) is detected before anything is
loaded. ``--resume auto`` falls back to the newest intact state and says which one was damaged.
Unlike :func:`xqtool.checkpoints.safe_io.write_checkpoint_dir` (one process), every process writes its RNG file
into the same temporary ``.step-NNNNNNN.tmp`` (a name each rank knows without communicating); the main process
renames it.

Errors: :class:`~xqtool.errors.CheckpointError` (one line, naming the state and the file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from xqtool.checkpoints.safe_io import count_non_finite, load_state_strict
from xqtool.errors import CheckpointError, ConfigError, DataError
from xqtool.fsutil import _translate_os_errors, apply_umask, file_sha256

log = logging.getLogger(__name__)

STATE_DIR = "checkpoints"
STATE_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "xqtool-train-state/2"
SKELETON_KEY = "xqtool_skeleton"
ALLOW_FLAG = "--set train.allow_batch_change=true"


def state_path(run_dir: Path, step: int) -> Path:
    """``run_dir/checkpoints/step-NNNNNNN``."""
    return Path(run_dir) / STATE_DIR / f"{STATE_PREFIX}{step:07d}"


def list_states(run_dir: Path) -> List[Path]:
    """Training-state directories of a run that carry their ``trainer_state.json``, oldest first."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(STATE_PREFIX):]
        if p.name.startswith(STATE_PREFIX) and suffix.isdigit() and (p / STATE_FILE).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def has_states(run_dir: Path) -> bool:
    """True when the run holds any training state (complete or not)."""
    root = Path(run_dir) / STATE_DIR
    return root.is_dir() and any(p.name.startswith(STATE_PREFIX) for p in root.iterdir())


# ============================================================================ safe (de)serialisation
def _pack(obj: Any, tensors: Dict[str, Tensor]) -> Any:
    """Nested state → JSON skeleton; tensors go to `tensors` (cloned to CPU) and are referenced by key."""
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__t__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "ui" else obj.dtype))
        return {"__np__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__d__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def _unpack(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__t__" in obj:
            return tensors[obj["__t__"]]
        if "__np__" in obj:
            return tensors[obj["__np__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        if "__d__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__d__"]}
        raise ValueError(f"unknown entry {sorted(obj)[:3]}")
    return obj


def _write_component(path: Path, state: Any) -> None:
    from safetensors.torch import save_file

    tensors: Dict[str, Tensor] = {}
    skeleton = _pack(state, tensors)
    save_file(tensors, str(path), metadata={SKELETON_KEY: json.dumps(skeleton), "format": "pt"})


def _read_component(path: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if SKELETON_KEY not in meta:
        raise ValueError("no xqtool state metadata")
    return _unpack(json.loads(meta[SKELETON_KEY]), tensors)


# ============================================================================ RNG
def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states of this process."""
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============================================================================ finiteness
def first_nonfinite(named: Iterable[Tuple[str, Any]]) -> Optional[str]:
    """Name of the first floating tensor holding NaN/Inf in `named` (nested state dicts allowed), else None."""
    for name, value in named:
        if isinstance(value, Tensor):
            if value.is_floating_point() and value.numel() and count_non_finite(value):
                return name
        elif isinstance(value, dict):
            hit = first_nonfinite((f"{name}.{k}", v) for k, v in value.items())
            if hit:
                return hit
        elif isinstance(value, (list, tuple)):
            hit = first_nonfinite((f"{name}.{i}", v) for i, v in enumerate(value))
            if hit:
                return hit
    return None


class NonFiniteError(CheckpointError):
    """A save was refused because a weight (or optimizer / EMA tensor) is NaN or Inf."""


# ============================================================================ save
def _component_state(accelerator: Any, obj: Any) -> Any:
    if isinstance(obj, nn.Module):
        return accelerator.get_state_dict(obj, unwrap=True)
    return obj.state_dict()


@contextlib.contextmanager
def _removing_on_error(tmp: Path) -> Iterator[None]:
    """Remove the half-written temporary state folder `tmp` when the body raises."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_state_atomic(accelerator: Any, run_dir: Path, step: int, components: Mapping[str, Any],
                      info: Dict[str, Any], keep: int) -> Path:
    """Write a training state for `step`: every component of `components` (objects with ``state_dict``;
    modules through ``accelerator.get_state_dict``), each process's RNG, and ``trainer_state.json``
    (`info` + file sizes and hashes) into a temp dir, then rename; keep the newest `keep` (0 → all).

    Raises :class:`NonFiniteError` (nothing written) when any floating tensor is NaN/Inf.
    """
    final = state_path(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    states = {name: _component_state(accelerator, obj) for name, obj in components.items()}
    bad = first_nonfinite(states.items())
    if bad is not None:
        raise NonFiniteError(f"refusing to save the training state of step {step}: {bad} holds NaN/Inf values")
    with _translate_os_errors(final), _removing_on_error(tmp):  # disk full: one line, earlier states intact
        if accelerator.is_main_process:
            final.parent.mkdir(parents=True, exist_ok=True)
            for stale in final.parent.glob(f".{STATE_PREFIX}*.tmp"):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        _write_component(tmp / f"rng-{accelerator.process_index}.safetensors", rng_state())
        if accelerator.is_main_process:
            for name, state in states.items():
                _write_component(tmp / f"{name}.safetensors", state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
            doc = {"format": STATE_FORMAT, "step": int(step), "world_size": accelerator.num_processes,
                   "components": sorted(states), **info, "files": files}
            (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1))
            apply_umask(tmp, recursive=True)  # final files 0644 / folders 0755 under umask 022
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep > 0:
                for old in list_states(run_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ============================================================================ load
@dataclass
class LoadedState:
    """A training state read and verified in memory (nothing applied yet)."""

    path: Path
    info: Dict[str, Any]
    components: Dict[str, Any] = field(default_factory=dict)
    rng: Optional[Dict[str, Any]] = None

    @property
    def step(self) -> int:
        return int(self.info["step"])


def read_state(path: Path) -> Dict[str, Any]:
    """The ``trainer_state.json`` of a state directory (CheckpointError when unreadable)."""
    try:
        doc = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"training state {path} is damaged: cannot read {STATE_FILE} ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"training state {path} is damaged: {STATE_FILE} is not a mapping")
    return doc


def load_verified(path: Path, rank: int = 0) -> LoadedState:
    """Read and verify every file of the state at `path` (sizes, hashes, formats); no code is ever run.

    Raises CheckpointError naming the state and the damaged file, or explaining an old (pickled) format.
    """
    path = Path(path)
    doc = read_state(path)
    if doc.get("format") != STATE_FORMAT:
        if any(path.glob("*.pkl")) or (path / "optimizer.bin").exists():
            raise CheckpointError(
                f"training state {path} holds Accelerate pickles (written by an older xqtool), which are never "
                "loaded because they can run code: start a new run in another output dir")
        raise CheckpointError(f"training state {path} is damaged: {STATE_FILE} has no format {STATE_FORMAT!r}")
    files = doc.get("files")
    if not isinstance(files, dict) or "step" not in doc:
        raise CheckpointError(f"training state {path} is damaged: {STATE_FILE} lacks its file list")
    for name, meta in files.items():
        p = path / name
        if "/" in name or name.startswith(".") or not p.is_file():
            raise CheckpointError(f"training state {path} is damaged: {name} is missing")
        if p.stat().st_size != meta.get("size") or file_sha256(p) != meta.get("sha256"):
            raise CheckpointError(f"training state {path} is damaged: {name} is truncated or altered")
    loaded = LoadedState(path=path, info=doc)
    try:
        for name in doc.get("components", []):
            loaded.components[name] = _read_component(path / f"{name}.safetensors")
        rng_file = path / f"rng-{rank}.safetensors"
        if rng_file.is_file():
            loaded.rng = _read_component(rng_file)
    except Exception as exc:  # safetensors/json parse errors of a file whose hash matched (hand-edited JSON)
        raise CheckpointError(f"training state {path} is damaged: {str(exc).splitlines()[0][:120]}") from None
    return loaded


def resolve_resume(resume: Optional[str], run_dir: Path, rank: int = 0) -> Optional[LoadedState]:
    """``None``/empty → no resume; ``auto`` → newest intact state of `run_dir` (None when it has none; a
    damaged newer state is reported and skipped); a run directory → its newest intact state; a state
    directory → itself (CheckpointError when damaged)."""
    if not resume:
        return None
    path = Path(run_dir) if resume == "auto" else Path(resume)
    if resume == "auto" or (path / STATE_DIR).is_dir():
        states = list_states(path)
        if not states:
            if resume != "auto":
                raise CheckpointError(f"--resume {resume}: the run holds no complete training state")
            if has_states(path):
                raise CheckpointError(f"{path / STATE_DIR} holds no complete training state: start a new run "
                                      "in another output dir")
            return None
        errors = []
        for cand in reversed(states):
            try:
                loaded = load_verified(cand, rank)
            except CheckpointError as exc:
                errors.append(str(exc))
                log.warning("%s; trying an older state", exc)
                continue
            if errors:
                log.warning("resuming from %s instead (the newest intact state)", cand)
            return loaded
        raise CheckpointError(f"every training state under {path / STATE_DIR} is damaged ({errors[0]})")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {resume}: not a complete training state (expected {STATE_DIR}/{STATE_PREFIX}N with "
            f"{STATE_FILE}); use --resume auto or a run directory"
        )
    return load_verified(path, rank)


def apply_state(accelerator: Any, loaded: LoadedState, components: Mapping[str, Any]) -> None:
    """Load every component of `loaded` into `components` (same names as when saved) and restore RNG."""
    missing = [n for n in components if n not in loaded.components]
    if missing:
        raise CheckpointError(f"training state {loaded.path} has no {', '.join(missing)} (saved by another setup)")
    for name, obj in components.items():
        state = loaded.components[name]
        lead = f"training state {loaded.path}: {name} does not fit this run"
        if isinstance(obj, nn.Module):
            load_state_strict(accelerator.unwrap_model(obj), state, lead)
            continue
        try:
            obj.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{lead} ({str(exc).splitlines()[0][:120]})") from None
    if loaded.rng is not None and int(loaded.info.get("world_size", 1)) == accelerator.num_processes:
        set_rng_state(loaded.rng)


def check_geometry(loaded: LoadedState, *, global_batch: int, world: int, allow: bool,
                   world_exact: bool) -> Optional[str]:
    """Compare the saved global batch / process count with this run's.

    Returns None when unchanged, or a one-line announcement of the remap. A changed global batch (lr and
    schedule change with it), or a changed process count when the data stream is per process
    (`world_exact` False), is refused with a ConfigError naming both values and the flag, unless `allow`.
    """
    old_b = int(loaded.info.get("global_batch", global_batch))
    old_w = int(loaded.info.get("world_size", world))
    seen = int(loaded.info.get("samples_seen", 0))
    if old_b == global_batch and old_w == world:
        return None
    if old_b != global_batch and not allow:
        raise ConfigError(f"--resume: the saved run used global batch {old_b}, this one {global_batch} (lr and "
                          f"schedule change with it); pass {ALLOW_FLAG} to continue from sample {seen}, or "
                          f"set the batch back to {old_b}")
    if old_w != world and not world_exact and not allow:
        raise ConfigError(f"--resume: the saved run used {old_w} processes, this one {world} (each process reads "
                          f"its own part of the data stream); pass {ALLOW_FLAG} to continue approximately, or "
                          f"launch {old_w} processes")
    exact = world_exact or old_w == world
    parts = []
    if old_b != global_batch:
        parts.append(f"global batch {old_b} -> {global_batch}")
    if old_w != world:
        parts.append(f"processes {old_w} -> {world}")
    return (f"resume remapped: {', '.join(parts)}; data continues {'at' if exact else 'near'} sample {seen}"
            + ("" if exact else " (per-process streams differ)"))


# ============================================================================ resumable batches
class SampleBatches:
    """Endless batches of exactly `batch` samples cut from per-epoch iterables of (possibly other-sized) batches.

    `make_epoch(e)` returns an iterable of dict batches (tensors share dim 0, other values are lists);
    only `keys` are kept. The position (epoch, samples consumed in the epoch) is exact at any sample, so
    a resumed stream — even with another batch size — continues with the very next sample. An epoch's final
    partial batch is dropped. DataError when an epoch yields no complete batch.
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[Dict[str, Any]]], batch: int,
                 keys: Sequence[str], epoch: int = 0, offset: int = 0) -> None:
        self.make_epoch, self.batch, self.keys = make_epoch, int(batch), tuple(keys)
        self.epoch, self.offset = int(epoch), int(offset)
        self._it: Optional[Iterator[Dict[str, Any]]] = None

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def _epoch_batches(self) -> Iterator[Dict[str, Any]]:
        while True:
            skip, pending, n_pending, produced = self.offset, [], 0, 0
            for b in self.make_epoch(self.epoch):
                n = len(b[self.keys[0]])
                if skip >= n:
                    skip -= n
                    continue
                if skip:
                    b = {k: b[k][skip:] for k in self.keys}
                    n -= skip
                    skip = 0
                pending.append(b)
                n_pending += n
                while n_pending >= self.batch:
                    out, need, rest = {k: [] for k in self.keys}, self.batch, []
                    for piece in pending:
                        m = len(piece[self.keys[0]])
                        take = min(m, need)
                        if take:
                            for k in self.keys:
                                out[k].append(piece[k][:take])
                            need -= take
                        if take < m:
                            rest.append({k: piece[k][take:] for k in self.keys})
                    pending, n_pending = rest, n_pending - self.batch
                    self.offset += self.batch
                    produced += 1
                    yield {k: torch.cat([torch.as_tensor(v) for v in vals]) for k, vals in out.items()}
            if produced == 0 and self.offset == 0:
                raise DataError("the training data yielded no complete batch (fewer samples than one batch?)")
            self.epoch, self.offset = self.epoch + 1, 0

    def __iter__(self) -> "SampleBatches":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._it is None:
            self._it = self._epoch_batches()
        return next(self._it)
