"""``xqtool sample``: class-conditional images from a VAR + its frozen tokenizer (spec var.md §4).

Labels: ``classes`` (list) each repeated ``per_class`` times, or ``per_class`` over all classes (class-major:
image i has class i // per_class), or ``num_samples`` cycling over the given / all classes.
Image i (global index) is drawn with its own generator seeded ``seed + i``, so the output does not depend on
the batch size or the number of processes (``upstream_rng=True`` instead seeds one generator per batch with
``seed + batch start``, upstream's scheme, which does depend on the batch size, and converts to uint8 by
truncation as the original does; the default rounds).
Outputs: PNGs ``DIR/classCCCC_IIIIII.png`` (class id, index of the image within its class), and/or an ``.npz``
with ``arr_0`` uint8 [N, H, W, 3] (FID tools, global index order), and/or a preview grid with one row per class. Multi-GPU: each Accelerate process takes a contiguous slice; the main process merges the npz.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from xqtool.errors import ConfigError
from xqtool.fsutil import atomic_path, check_output, fresh_output_dir, output_lock
from xqtool.metrics import to_uint8_hwc
from xqtool.runtime import amp_dtype
from xqtool.tasks.injected import Injected

log = logging.getLogger(__name__)

__all__ = ["plan_labels", "parse_classes", "sample_images", "SampleSettings", "SampleResult", "png_names",
           "unseen_classes", "class_grid"]

GRID_MAX_CLASSES = 16
GRID_MAX_PER_CLASS = 16


def png_names(labels: Sequence[int]) -> List[str]:
    """File name of every image: ``class{label:04d}_{k:06d}.png`` with k = index of the image within its class."""
    seen: dict = {}
    names = []
    for c in labels:
        k = seen.get(int(c), 0)
        seen[int(c)] = k + 1
        names.append(f"class{int(c):04d}_{k:06d}.png")
    return names


def unseen_classes(info: Any, labels: Sequence[int]) -> List[int]:
    """Requested class ids that never occurred in the VAR's training data (``classes_seen`` of its config.yaml).

    Empty when the checkpoint does not record them (official checkpoints, older xqtool runs).
    """
    conf = (info or {}).get("config") or {}
    seen = conf.get("classes_seen")
    if seen is None:
        return []
    seen_set = {int(c) for c in seen}
    return sorted({int(c) for c in labels} - seen_set)


def class_grid(images: np.ndarray, labels: Sequence[int], padding: int = 2) -> np.ndarray:
    """uint8 [H', W', 3] preview: one row per class (first 16 classes, up to 16 images each, in label order)."""
    order: dict = {}
    for i, c in enumerate(labels):
        if int(c) not in order and len(order) >= GRID_MAX_CLASSES:
            continue
        row = order.setdefault(int(c), [])
        if len(row) < GRID_MAX_PER_CLASS:
            row.append(i)
    rows = list(order.values())
    n_cols = max((len(r) for r in rows), default=1)
    h, w = images.shape[1:3]
    out = np.zeros((len(rows) * (h + padding) + padding, n_cols * (w + padding) + padding, 3), np.uint8)
    for r, idx in enumerate(rows):
        for c, i in enumerate(idx):
            y, x = padding + r * (h + padding), padding + c * (w + padding)
            out[y:y + h, x:x + w] = images[i]
    return out


@dataclass
class SampleResult:
    """What :func:`sample_images` produced."""

    count: int
    seconds: float
    images_per_s: float
    out_dir: Optional[Path]
    npz: Optional[Path]
    grid: Optional[Path]
    peak_mem_mb: float = 0.0
    launch: str = ""  # world size, backend, device, precision (xqtool.distributed.describe)
    is_main: bool = True


def parse_classes(spec: Union[str, Sequence[int], None]) -> Optional[List[int]]:
    """'1,207,980' → [1, 207, 980]; None/'' → None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        try:
            return [int(s) for s in spec.replace(" ", "").split(",") if s]
        except ValueError:
            raise ConfigError(f"--classes must be comma-separated integers like 1,207,980, got '{spec}'") from None
    return [int(c) for c in spec]


def plan_labels(num_classes: int, classes: Optional[Sequence[int]] = None, per_class: Optional[int] = None,
                num_samples: Optional[int] = None) -> List[int]:
    """The label of every image, in global index order."""
    pool = list(classes) if classes else list(range(num_classes))
    bad = [c for c in pool if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: the model has classes 0..{num_classes - 1}")
    if per_class is not None:
        if per_class < 1:
            raise ConfigError("--per-class must be >= 1")
        labels = [c for c in pool for _ in range(per_class)]
        return labels[:num_samples] if num_samples else labels
    if not num_samples or num_samples < 1:
        raise ConfigError("give --num-samples N or --per-class N")
    return [pool[i % len(pool)] for i in range(num_samples)]


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "xqtool")
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", pnginfo=info)


def _is_xqtool_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(getattr(im, "text", {}).get("Software", "")).startswith("xqtool")
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False


def _is_sample_npz(path: Path) -> bool:
    """An images .npz as `xqtool sample` writes it: a zip holding exactly ``arr_0.npy``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist() == ["arr_0.npy"]
    except (OSError, zipfile.BadZipFile):
        return False


def check_var_tokenizer(info: Any, tokenizer: Any, what: str, ignore_fingerprint: bool = False) -> None:
    """TokenError when the VAR checkpoint (``load_var`` info) records other tokenizer weights than `tokenizer`'s."""
    from xqtool.data.tokens import check_fingerprint

    recorded = ""
    if isinstance(info, dict) and info.get("format") == "xqtool":
        tok = (info.get("config") or {}).get("tokenizer") or {}
        recorded = str(tok.get("weights_fingerprint", "") or "") if isinstance(tok, dict) else ""
    elif isinstance(info, dict) and info.get("format") == "official":
        return  # released checkpoints carry no fingerprint; their tokenizer is checked by geometry only
    check_fingerprint(recorded, tokenizer, what, ignore_fingerprint)


@dataclass(kw_only=True)
class SampleSettings:
    """One ``xqtool sample`` run (see :func:`sample_images`).

    Attributes:
        labels: the class of each image to sample (image i uses seed + i); see :func:`plan_labels`.
        var_ckpt / tokenizer_ckpt: checkpoints, read unless the VAR / the tokenizer is injected.
        cfg, top_k, top_p, temperature: sampling settings (var.md §4); seed: base seed.
        batch_size: images sampled together; decode_batch: images decoded together (1: bytes independent of
            the batch size and the number of processes, equal to ``xqtool decode`` of the same tokens).
        out_dir / npz / grid: outputs (PNG folder, ``arr_0`` uint8 [N, H, W, 3] ``.npz``, class grid PNG);
            at least one. overwrite: replace only earlier xqtool sample outputs.
        precision: ``fp32 | bf16 | fp16``; upstream_rng: the reference's RNG and uint8 conversion (var.md §7.12).
        cpu: run on the CPU; pack: CPU only, run the transformer's linears on oneDNN pre-packed weights.
        ignore_fingerprint: accept a VAR trained on other tokenizer weights.
    """

    labels: Sequence[int]
    var_ckpt: Optional[Union[str, Path]] = None
    tokenizer_ckpt: Optional[Union[str, Path]] = None
    ignore_fingerprint: bool = False
    # sampling (var.md §4)
    cfg: float = 3.25
    top_k: int = 750
    top_p: float = 0.95
    temperature: float = 1.0
    seed: int = 0
    upstream_rng: bool = False
    # outputs
    out_dir: Optional[Union[str, Path]] = None
    npz: Optional[Union[str, Path]] = None
    grid: Optional[Union[str, Path]] = None
    overwrite: bool = False
    # execution
    batch_size: int = 25
    decode_batch: int = 1
    use_cache: bool = True
    precision: str = "fp32"
    cpu: bool = False
    pack: bool = True


def sample_images(settings: SampleSettings, injected: Optional[Injected] = None) -> SampleResult:
    """Sample ``len(settings.labels)`` images with a VAR and its tokenizer (loaded frozen, eval).

    Reads ``injected.var`` / ``injected.tokenizer`` (used instead of loading the checkpoints), ``injected.var_info``
    (the info dict of ``load_var`` for an injected VAR: enables the fingerprint check) and ``injected.console``
    (live progress bar on the main process).

    Tokens never depend on the batch size; the sampler's running f_hat and the tokenizer decoder's float
    rounding can (kernels pick different blockings per batch size), so each image's f_hat is rebuilt from its
    tokens and decoded ``decode_batch`` (default 1) at a time: with 1 the PNG/npz bytes are identical whatever
    ``batch_size`` or the number of processes, and equal to ``xqtool decode`` of the same tokens. ``pack`` (CPU
    only) runs the transformer's linears on oneDNN pre-packed weights (``VAR.packed_linears``): faster, one extra
    weight copy.

    Outputs are checked before sampling: OutputError when one exists (``overwrite`` replaces only earlier
    xqtool sample outputs), is locked by another process, or is a file where a folder is expected. A VAR
    checkpoint recording other tokenizer weights (fingerprint) is refused with TokenError unless
    ``ignore_fingerprint``. ConfigError when nothing is to be written or for a bad precision.
    """
    from accelerate import Accelerator

    s, injected = settings, injected or Injected()
    if s.out_dir is None and s.npz is None and s.grid is None:
        raise ConfigError("nothing to write: give -o/--output DIR, --npz FILE and/or --grid FILE")
    amp_dtype(s.precision)
    accelerator = Accelerator(cpu=s.cpu)
    from xqtool.distributed import check_launch, describe

    check_launch(accelerator.num_processes)
    if accelerator.is_main_process:
        log.info("sample: %s", describe(accelerator, s.precision))
    var, var_info, what = injected.var, injected.var_info, "the VAR"
    if var is None:
        from xqtool.checkpoints import load_var

        what = f"the VAR {s.var_ckpt}"
        var, var_info = load_var(s.var_ckpt)
    tokenizer = injected.tokenizer
    if tokenizer is None:
        from xqtool.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(s.tokenizer_ckpt)
    if var_info is not None:
        check_var_tokenizer(var_info, tokenizer, what, s.ignore_fingerprint)
    out_dir = Path(s.out_dir) if s.out_dir is not None else None
    npz_path = Path(s.npz) if s.npz is not None else None
    grid_path = Path(s.grid) if s.grid is not None else None
    replace_dir = False
    if accelerator.is_main_process:
        if out_dir is not None:
            replace_dir = check_output(out_dir, kind="sample", is_dir=True, overwrite=s.overwrite)
        if npz_path is not None:
            check_output(npz_path, kind="sample", is_dir=False, overwrite=s.overwrite, ours=_is_sample_npz)
        if grid_path is not None:
            check_output(grid_path, kind="sample", is_dir=False, overwrite=s.overwrite, ours=_is_xqtool_png)
    main = accelerator.is_main_process
    with contextlib.ExitStack() as guard:
        for p in (out_dir, npz_path, grid_path):
            if p is not None:
                guard.enter_context(output_lock(p, enabled=main))
        if out_dir is not None:
            guard.enter_context(fresh_output_dir(out_dir, "sample", replace=replace_dir, enabled=main))
        accelerator.wait_for_everyone()
        return _sample_into(s, accelerator, var, tokenizer, out_dir, npz_path, grid_path, injected.console)


def _sample_into(s: SampleSettings, accelerator: Any, var: Any, tokenizer: Any, out_dir: Optional[Path],
                 npz_path: Optional[Path], grid_path: Optional[Path], console: Any) -> SampleResult:
    from xqtool.distributed import describe
    from xqtool.models.var_sampling import sample_tokens

    device = accelerator.device
    var = var.to(device).eval().requires_grad_(False)
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    from xqtool.training.var_data import check_tokenizer_fit

    check_tokenizer_fit(var.config, tokenizer, trained=True)
    amp = amp_dtype(s.precision)
    labels, batch_size, seed = s.labels, s.batch_size, s.seed
    knobs = dict(cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, use_cache=s.use_cache,
                 amp_dtype=amp)

    n = len(labels)
    mine = np.array_split(np.arange(n), accelerator.num_processes)[accelerator.process_index]
    names = png_names(labels)
    keep = npz_path is not None or grid_path is not None
    chunks: List[np.ndarray] = []
    progress = None
    if console is not None and accelerator.is_main_process:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]sample"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console)
        progress.start()
        task = progress.add_task("sample", total=len(mine), rate="")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # CPU: the transformer's linears run on oneDNN pre-packed weights for the whole loop (no-op elsewhere).
    # Besides speed, their rows do not depend on the number of rows, which keeps tokens batch-size independent.
    packing = contextlib.ExitStack()
    if s.pack:
        packing.enter_context(var.packed_linears(amp or torch.float32))
    t0 = time.perf_counter()
    done = 0
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            lab = torch.tensor([labels[i] for i in idx], device=device)
            if s.upstream_rng:  # the reference's one generator per batch
                rng: Dict[str, Any] = {"generator": torch.Generator(device=device).manual_seed(seed + int(idx[0]))}
            else:  # image i draws from seed + i, whatever the batch
                rng = {"seeds": [seed + int(i) for i in idx]}
            out = sample_tokens(var, tokenizer.quantizer, lab, **knobs, **rng)
            with torch.no_grad():  # f_hat again from the tokens, one image at a time: batch-size invariant
                step = max(int(s.decode_batch), 1)
                images = np.concatenate([to_uint8_hwc(tokenizer.decode(out.tokens[j:j + step]),
                                                      truncate=s.upstream_rng) for j in range(0, len(idx), step)])
            if out_dir is not None:
                for i, arr in zip(idx, images):
                    _save_png(out_dir / names[int(i)], arr)
            if keep:
                chunks.append(images)
            done += len(idx)
            if progress is not None:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, advance=len(idx), rate=f"{rate:.2f} img/s")
    finally:
        packing.close()
        if progress is not None:
            progress.stop()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0

    if keep:
        local = np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 3), np.uint8)
        if accelerator.num_processes > 1:
            part = (npz_path or grid_path).with_name(f".{(npz_path or grid_path).name}.part{accelerator.process_index}.npy")
            np.save(part, local)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                parts = [part.with_name(f".{(npz_path or grid_path).name}.part{r}.npy")
                         for r in range(accelerator.num_processes)]
                local = np.concatenate([np.load(p) for p in parts])
                for p in parts:
                    p.unlink()
        if accelerator.is_main_process:
            if npz_path is not None:
                npz_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(npz_path) as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, arr_0=local)
            if grid_path is not None:
                grid_path.parent.mkdir(parents=True, exist_ok=True)
                _save_png(grid_path, class_grid(local, labels[:len(local)]))
    accelerator.wait_for_everyone()
    total = n if accelerator.num_processes > 1 else done
    return SampleResult(count=total, seconds=seconds, images_per_s=done / max(seconds, 1e-9),
                        out_dir=out_dir, npz=npz_path, grid=grid_path, peak_mem_mb=peak,
                        launch=describe(accelerator, s.precision), is_main=accelerator.is_main_process)
