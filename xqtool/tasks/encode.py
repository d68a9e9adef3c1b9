"""`xqtool encode`: images -> token ids [N, P, L] with a manifest, streaming and resumable.

Work is cut into *units*: one input shard each, or ``unit_size`` consecutive files of a folder / list.
Each process (Accelerate; units ``u`` with ``u % world == rank``) and each of its DataLoader workers
encodes whole units and writes every finished unit atomically into ``OUT.partial/``. Re-running after an
interruption keeps the finished units and encodes only the rest. When all units are done the main
process merges them into the final output, which appears atomically:

* ``OUT`` ending in ``.npy``: one int16/int32 array [N, P, L] (filled unit by unit through a memory map,
  never held whole) + ``OUT.json``; skipped inputs in ``OUT.skipped.txt``;
* otherwise a folder of token shards ``tokens-000000.tar`` ... + ``manifest.json`` (+ ``skipped.txt``).

Memory is bounded by the batch size and the token rows of the units in flight, not by the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from xqtool.data.images import check_policy, one_line_errors, process_records
from xqtool.data.shards import iter_shard_records, write_token_shard
from xqtool.data.sources import SourceLike, SourceSpec, file_records, resolve_source
from xqtool.data.tokens import TokenManifest, manifest_path, token_dtype
from xqtool.data.transforms import eval_preprocessing, view_names, view_transform
from xqtool.errors import ConfigError, DataError, OutputError
from xqtool.fsutil import aside_path, atomic_path, atomic_write_text, check_output, file_sha256, output_lock
from xqtool.runtime import amp_dtype, autocast
from xqtool.tasks.injected import Injected

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "flip", "ten-crop")
UNITS_DIR = "_units"
PLAN_FILE = "plan.json"


@dataclass
class EncodeResult:
    """Outcome of :func:`encode_images` (on non-main processes ``output`` is None)."""

    output: Optional[Path]
    count: int
    skipped: Dict[str, str] = field(default_factory=dict)
    manifest: Optional[TokenManifest] = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    units_total: int = 0
    units_resumed: int = 0
    skipped_file: Optional[Path] = None


# ------------------------------------------------------------------------------------------ paths


def partial_dir(output: Path) -> Path:
    """Where unfinished work lives: ``OUT.partial`` next to the output."""
    return output.with_name(output.name + ".partial")


def skipped_path(output: Path) -> Path:
    """``OUT.skipped.txt`` for a .npy output, ``OUT/skipped.txt`` for a shard folder."""
    return output.with_name(output.name + ".skipped.txt") if output.suffix == ".npy" else output / "skipped.txt"


def _unit_meta(work: Path, u: int) -> Path:
    return work / UNITS_DIR / f"unit-{u:06d}.json"


def _unit_npy(work: Path, u: int) -> Path:
    return work / UNITS_DIR / f"unit-{u:06d}.npy"


def _unit_shard_name(u: int) -> str:
    return f"tokens-{u:06d}.tar"


# ------------------------------------------------------------------------------------------ units


def _units(spec: SourceSpec, unit_size: int) -> List[Any]:
    """Unit u -> list of FileItems (files) or a shard URL."""
    if spec.kind == "shards":
        return list(spec.urls)
    return [spec.items[i : i + unit_size] for i in range(0, len(spec.items), unit_size)]


def _plan(spec: SourceSpec, unit_size: int, manifest: TokenManifest, output: Path, precision: str) -> Dict[str, Any]:
    """What the finished units depend on: a resume with any of it changed would mix two encodings."""
    h = hashlib.sha256()
    if spec.kind == "files":
        for it in spec.items:
            h.update(f"{it.path}\t{it.key}\t{it.label}\n".encode())
    else:
        for u in spec.urls:
            h.update(f"{u}\n".encode())
    return {
        "source": spec.description,
        "listing_sha256": h.hexdigest(),
        "unit_size": unit_size if spec.kind == "files" else None,
        "config_hash": manifest.config_hash,
        "weights_fingerprint": manifest.weights_fingerprint,
        "precision": precision,
        "preprocessing": manifest.preprocessing,
        "augmentation": manifest.augmentation,
        "image_size": manifest.image_size,
        "output_kind": "npy" if output.suffix == ".npy" else "shards",
    }


_PLAN_NAMES = {
    "source": "the source", "listing_sha256": "the source listing (files added, removed or renamed)",
    "unit_size": "--unit-size", "config_hash": "the tokenizer config", "weights_fingerprint": "the tokenizer weights",
    "precision": "--precision", "preprocessing": "the preprocessing", "augmentation": "the augmentation",
    "image_size": "the image size", "output_kind": "the output kind",
}


def _is_token_output(path: Path) -> bool:
    """An earlier `xqtool encode` output: a .npy with its manifest, or a folder with manifest.json."""
    try:
        TokenManifest.load(manifest_path(path))
    except Exception:  # noqa: BLE001 - anything unreadable is not recognisably ours
        return False
    return True


class _UnitStream(IterableDataset):
    """Samples of the given units; each DataLoader worker takes whole units and ends each with a marker.

    Sample: {"image": [3,S,S], "unit", "key", "path", "label", "view"}; marker: {"image": None,
    "unit", "bad": [(name, reason)]} after the unit's last sample.
    """

    def __init__(self, units: List[Any], unit_ids: List[int], kind: str, image_size: int, augmentation: str,
                 bad_files: str) -> None:
        super().__init__()
        self.units, self.unit_ids, self.kind = units, unit_ids, kind
        self.image_size, self.augmentation, self.bad_files = image_size, augmentation, bad_files

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        views = view_transform(self.image_size, self.augmentation)
        suffixes = view_names(self.augmentation)
        for u in self.unit_ids[worker::nworkers]:
            unit = self.units[u]
            records = file_records(unit) if self.kind == "files" else iter_shard_records(unit)
            bad: List[Tuple[str, str]] = []
            for rec, tensors in process_records(
                records, views, bad_files=self.bad_files, on_bad=lambda n, r: bad.append((n, r))
            ):
                for vi, (t, suffix) in enumerate(zip(tensors, suffixes)):
                    yield {"image": t, "unit": u, "key": rec.key + suffix, "path": rec.name,
                           "label": int(rec.label), "view": vi}
            yield {"image": None, "unit": u, "bad": bad}


def _collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    real = [s for s in samples if s["image"] is not None]
    return {
        "image": torch.stack([s["image"] for s in real]) if real else None,
        "rows": [{k: s[k] for k in ("unit", "key", "path", "label", "view")} for s in real],
        "ends": [(s["unit"], s["bad"]) for s in samples if s["image"] is None],
    }


# ------------------------------------------------------------------------------------------ writing units


def _write_unit(work: Path, u: int, rows: List[Dict[str, Any]], tokens: List[np.ndarray], bad: List[Tuple[str, str]],
                shards: bool, dtype: np.dtype) -> None:
    """Persist one finished unit atomically; its JSON (written last) marks it done."""
    arr = np.stack(tokens).astype(dtype) if tokens else None
    meta: Dict[str, Any] = {
        "unit": u,
        "count": len(rows),
        "keys": [r["key"] for r in rows],
        "paths": [r["path"] for r in rows],
        "labels": [r["label"] for r in rows],
        "bad": [list(b) for b in bad],
    }
    if shards:
        if arr is not None:
            with atomic_path(work / _unit_shard_name(u)) as tmp:
                write_token_shard(
                    tmp,
                    ({"key": r["key"], "tokens": t, "label": r["label"],
                      "meta": {"key": r["key"], "path": r["path"], "label": r["label"], "view": r["view"]}}
                     for r, t in zip(rows, arr)),
                )
            meta["shard"] = _unit_shard_name(u)
    elif arr is not None:
        with atomic_path(_unit_npy(work, u)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
    atomic_write_text(_unit_meta(work, u), json.dumps(meta) + "\n")


def _done_units(work: Path) -> Dict[int, Path]:
    out = {}
    for p in (work / UNITS_DIR).glob("unit-*.json"):
        try:
            out[int(p.stem.split("-")[1])] = p
        except (IndexError, ValueError):
            continue
    return out


def _prepare_work_dir(work: Path, plan: Dict[str, Any], is_main: bool, overwrite: bool = False) -> None:
    """Create ``OUT.partial`` with the plan, or check that the unfinished work there has the same plan.

    A different plan (tokenizer weights, precision, preprocessing, source listing, ...) is refused in one line
    naming the first difference; ``overwrite`` discards the unfinished work instead.
    """
    plan_file = work / PLAN_FILE
    if is_main:
        if work.exists() and not plan_file.is_file() and any(work.iterdir()):
            raise OutputError(f"{work} exists but is not unfinished xqtool encode work (no {PLAN_FILE}): move it away")
        if plan_file.exists():
            try:
                old = json.loads(plan_file.read_text())
            except (OSError, ValueError):
                old = {"plan": "unreadable"}
            if old != plan:
                if not overwrite:
                    if not isinstance(old, dict) or "plan" in old:
                        raise OutputError(f"{plan_file} is corrupt: pass --overwrite to discard the unfinished work")
                    key = next((k for k in plan if old.get(k) != plan[k]), next(iter(set(old) - set(plan)), "?"))
                    raise OutputError(
                        f"cannot resume {work}: {_PLAN_NAMES.get(key, key)} changed ({key} was {old.get(key)!r}, now "
                        f"{plan.get(key)!r}); resuming would mix two encodings: re-run with the same settings, or "
                        "pass --overwrite to discard the unfinished work"
                    )
                log.warning("discarding unfinished work in %s (--overwrite)", work)
                shutil.rmtree(work)
        (work / UNITS_DIR).mkdir(parents=True, exist_ok=True)
        if not plan_file.exists():
            atomic_write_text(plan_file, json.dumps(plan, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ merge


def _merge(work: Path, output: Path, n_units: int, manifest: TokenManifest, dtype: np.dtype,
           replace: bool = False) -> Tuple[TokenManifest, Dict[str, str]]:
    done = _done_units(work)
    missing = [u for u in range(n_units) if u not in done]
    if missing:
        raise DataError(f"{len(missing)} work units are unfinished (first: {missing[0]}): re-run the same command to resume")
    metas = [json.loads(done[u].read_text()) for u in range(n_units)]
    skipped: Dict[str, str] = {}
    for m in metas:
        for name, reason in m["bad"]:
            skipped[name] = reason
    total = sum(m["count"] for m in metas)
    if total == 0:
        shutil.rmtree(work, ignore_errors=True)
        first = next(iter(sorted(skipped.items())), ("", ""))
        raise DataError(f"no readable images: all {len(skipped)} inputs were bad (first: {first[0]}: {first[1]})")
    manifest.count = total
    manifest.dtype = dtype.name
    manifest.skipped = len(skipped)
    P, L = manifest.num_branches, manifest.tokens_per_branch
    if output.suffix == ".npy":
        if (output.exists() or manifest_path(output).exists()) and not replace:
            raise OutputError(f"{output} appeared while encoding: refusing to replace it (the units are in {work})")
        keys: List[str] = []
        paths: List[str] = []
        labels: List[int] = []
        with atomic_path(output) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, P, L))
            row = 0
            for u, m in enumerate(metas):
                keys += m["keys"]
                paths += m["paths"]
                labels += m["labels"]
                if m["count"]:
                    part = np.load(_unit_npy(work, u), mmap_mode="r")
                    arr[row : row + m["count"]] = part
                    row += m["count"]
            arr.flush()
            del arr
            manifest.sha256 = file_sha256(tmp)
        manifest.keys, manifest.paths, manifest.labels = keys, paths, labels
        manifest.save(manifest_path(output))
        sp = skipped_path(output)
        if skipped:
            atomic_write_text(sp, "".join(f"{n}\t{r}\n" for n, r in sorted(skipped.items())))
        elif sp.exists() and replace:
            sp.unlink()
        shutil.rmtree(work)
    else:
        manifest.shards = [{"name": m["shard"], "count": m["count"], "sha256": file_sha256(work / m["shard"])}
                           for m in metas if m.get("shard")]
        shutil.rmtree(work / UNITS_DIR)
        (work / PLAN_FILE).unlink()
        manifest.save(work / "manifest.json")
        if skipped:
            (work / "skipped.txt").write_text("".join(f"{n}\t{r}\n" for n, r in sorted(skipped.items())))
        from xqtool.fsutil import apply_umask

        apply_umask(work, recursive=True)
        if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
            output.rmdir()  # an empty folder given as the output holds nothing to lose
        if output.exists():
            if not replace or not _is_token_output(output):
                raise OutputError(f"{output} appeared while encoding: refusing to replace it (the tokens are in {work})")
            old = aside_path(output)
            os.replace(output, old)
            os.replace(work, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, output)
    return manifest, skipped


# ------------------------------------------------------------------------------------------ main entry


def _load_tok(ckpt: Union[str, Path], config: Optional[Union[str, Path]], device: torch.device) -> Any:
    from xqtool.checkpoints import load_tokenizer

    return load_tokenizer(ckpt, config=config, map_location=device)


def token_output_path(raw: Union[str, Path]) -> Path:
    """Validate the form of an ``encode`` output: ``X.npy`` (one token file), ``DIR/`` (token shards, note the
    trailing slash) or an existing folder. Anything else (``tokens.npz``, ``tokens``) is a ConfigError naming
    the accepted forms, so a typo never silently becomes a shard folder.
    """
    text = str(raw)
    path = Path(text)
    if path.suffix == ".npy" and not path.is_dir():
        return path
    if text.endswith(("/", "\\")) or path.is_dir():
        return path
    raise ConfigError(f"-o/--output {text}: give X.npy (one token file), DIR/ (token-shard folder; note the "
                      "trailing slash) or an existing folder")


@dataclass(kw_only=True)
class EncodeSettings:
    """One ``xqtool encode`` run (see :func:`encode_images`).

    Attributes:
        source: any image source of :func:`xqtool.data.sources.resolve_source`.
        output: ``X.npy`` or a folder for token shards (see :func:`token_output_path`).
        ckpt / config: tokenizer checkpoint (xqtool dir or official .pt) and optional config YAML; required
            unless a tokenizer is injected.
        device: None = the process's accelerator device; precision: ``fp32 | bf16 | fp16`` autocast.
        augmentation: 'none', 'flip' (2 rows per image, keys ``k`` and ``k@flip``) or 'ten-crop'
            (10 rows, keys ``k@crop0`` .. ``k@crop9``); recorded in the manifest.
        bad_files: ``skip | fail`` for unreadable inputs; unit_size: files per resumable work unit.
        overwrite: replace an existing earlier `xqtool encode` output (anything else is never replaced), and
            discard unfinished work made with other settings instead of refusing to resume it.
    """

    source: SourceLike
    output: Union[str, Path]
    ckpt: Optional[Union[str, Path]] = None
    config: Optional[Union[str, Path]] = None
    batch_size: int = 32
    num_workers: int = 0
    device: Optional[str] = None
    precision: str = "fp32"
    augmentation: str = "none"
    bad_files: str = "skip"
    unit_size: int = 1000
    overwrite: bool = False


def encode_images(settings: EncodeSettings, injected: Optional[Injected] = None) -> EncodeResult:
    """Encode every image of ``settings.source`` into token ids; see the module docstring for outputs.

    Reads ``injected.tokenizer`` (used instead of loading ``settings.ckpt``), ``injected.progress`` (called with
    the number of images (views) just encoded) and ``injected.on_start`` (called once with the number of images
    to encode now; None when unknown: shards).

    Raises ConfigError for bad settings, and OutputError (nothing touched) when the output exists (without
    ``overwrite``), is not an xqtool token output, lies inside / contains the source, is locked by another
    process, or when unfinished work in ``OUT.partial`` was made with another tokenizer (weights), precision,
    preprocessing or source listing.
    """
    from xqtool.distributed import describe, process_state

    s, injected = settings, injected or Injected()
    if s.augmentation not in AUGMENTATIONS:
        raise ConfigError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, not {s.augmentation!r}")
    amp_dtype(s.precision)
    if s.batch_size < 1 or s.unit_size < 1:
        raise ConfigError("--batch-size and the unit size must be at least 1")
    check_policy(s.bad_files)
    output = Path(s.output)
    state = process_state()  # CPU processes (gloo) under ACCELERATE_USE_CPU; real rank / world size
    if state.is_main_process:
        log.info("encode: %s", describe(state, s.precision))
    dev = torch.device(s.device) if s.device else state.device
    sources = [s.source] if isinstance(s.source, (str, os.PathLike)) else []
    is_dir_out = output.suffix != ".npy"
    work = partial_dir(output)
    if state.is_main_process:
        check_output(output, kind="encode", is_dir=is_dir_out, overwrite=s.overwrite, ours=_is_token_output,
                     sources=sources)
        check_output(work, kind="encode", is_dir=True, overwrite=True, ours=lambda p: (p / PLAN_FILE).is_file(),
                     sources=sources)
        if not is_dir_out:
            check_output(manifest_path(output), kind="encode", is_dir=False, overwrite=s.overwrite,
                         ours=lambda p: _is_token_output(output), sources=sources)
    with output_lock(output, enabled=state.is_main_process), _drop_empty_work(work, state.is_main_process):
        return _encode_locked(s, injected, output, work, state, dev)


@contextmanager
def _drop_empty_work(work: Path, is_main: bool) -> Iterator[None]:
    """On failure, remove ``OUT.partial`` when it holds no finished unit (nothing to resume, nothing left behind)."""
    try:
        yield
    except BaseException:
        if is_main and work.is_dir() and not _done_units(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _encode_locked(s: EncodeSettings, injected: Injected, output: Path, work: Path, state: Any,
                   dev: torch.device) -> EncodeResult:
    spec = resolve_source(s.source)
    augmentation, unit_size, ckpt = s.augmentation, s.unit_size, s.ckpt
    tok = injected.tokenizer if injected.tokenizer is not None else _load_tok(_require(ckpt), s.config, dev)
    tok = tok.to(dev).eval()
    n_views = len(view_names(augmentation))
    manifest = TokenManifest.from_tokenizer(
        tok,
        checkpoint=str(ckpt) if ckpt is not None else "",
        preprocessing=eval_preprocessing(),
        augmentation=augmentation,
        views=n_views,
        source=spec.description,
        classes=spec.classes,
    )
    dtype = token_dtype(tok.codebook_size)
    units = _units(spec, unit_size)
    _prepare_work_dir(work, _plan(spec, unit_size, manifest, output, s.precision), state.is_main_process, s.overwrite)
    state.wait_for_everyone()

    done_before = _done_units(work)
    mine = [u for u in range(len(units)) if u % state.num_processes == state.process_index and u not in done_before]
    if injected.on_start is not None:
        injected.on_start(sum(len(units[u]) for u in mine) * n_views if spec.kind == "files" else None)

    start = time.perf_counter()
    n_encoded = _encode_units(
        tok, units, mine, spec.kind, work, dtype, output.suffix != ".npy",
        image_size=int(tok.image_size), augmentation=augmentation, bad_files=s.bad_files,
        batch_size=s.batch_size, num_workers=s.num_workers, device=dev, precision=s.precision,
        progress=injected.progress,
    )
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    result = EncodeResult(None, n_encoded, seconds=seconds, images_per_s=n_encoded / max(seconds, 1e-9),
                          units_total=len(units), units_resumed=len(done_before))
    if not state.is_main_process:
        return result
    manifest, skipped = _merge(work, output, len(units), manifest, dtype, replace=s.overwrite)
    result.output = output
    result.count = manifest.count
    result.manifest = manifest
    result.skipped = skipped
    result.skipped_file = skipped_path(output) if skipped else None
    return result


def _require(ckpt: Optional[Union[str, Path]]) -> Union[str, Path]:
    if ckpt is None:
        raise ConfigError("--tokenizer/-t is required: give a tokenizer checkpoint directory or official .pt file")
    return ckpt


def _encode_units(
    tok: Any, units: List[Any], mine: List[int], kind: str, work: Path, dtype: np.dtype, shards: bool, *,
    image_size: int, augmentation: str, bad_files: str, batch_size: int, num_workers: int,
    device: torch.device, precision: str, progress: Optional[Callable[[int], None]],
) -> int:
    """Encode the units `mine` of this process; write each as it completes -> number of rows encoded."""
    if not mine:
        return 0
    ds = _UnitStream(units, mine, kind, image_size, augmentation, bad_files)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    amp = autocast(device, precision)
    pending: Dict[int, Tuple[List[Dict[str, Any]], List[np.ndarray]]] = {}
    n = 0
    for batch in one_line_errors(loader):
        if batch["image"] is not None:
            with torch.inference_mode(), amp:
                codes = tok.encode(batch["image"].to(device, non_blocking=True))
            codes_np = codes.cpu().numpy()
            for row, t in zip(batch["rows"], codes_np):
                rows, toks = pending.setdefault(row["unit"], ([], []))
                rows.append(row)
                toks.append(t)
            n += len(batch["rows"])
            if progress is not None:
                progress(len(batch["rows"]))
        for u, bad in batch["ends"]:
            rows, toks = pending.pop(u, ([], []))
            _write_unit(work, u, rows, toks, bad, shards, dtype)
    return n
