"""FID / KID / Inception Score (clean-fid backend) and tokenizer reconstruction metrics (rFID, PSNR, SSIM, LPIPS).

Inputs for :func:`evaluate_fid` (each side):

* a folder of images (searched recursively, sorted, clean-fid's extensions), read at native resolution
  (RGB; alpha over white) unless ``image_size`` asks for an ADM center crop first;
* an ``.npz`` holding uint8 images ``arr_0`` ``[N, H, W, 3]`` (what ``xqtool sample`` and ADM write);
* a statistics ``.npz`` with ``mu`` / ``sigma`` (clean-fid custom stats, or an ADM reference batch, which also
  holds images in ``arr_0``: by default the images are used, so that both sides go through the same
  Inception; ``use_npz_stats=True`` uses the stored ``mu``/``sigma`` instead);
* ``ref_stats=NAME``: clean-fid custom statistics made by :func:`make_fid_stats` (or by clean-fid's own
  ``make_custom_stats``), looked up in ``stats_dir`` / ``$XQTOOL_FID_STATS_DIR`` / clean-fid's stats folder.

Every evaluation writes a JSON report (atomic) and returns it as a dict. The entry points take a settings
dataclass (:class:`FidSettings`, :class:`FidStatsSettings`, both :class:`FeatureOptions`) plus an optional
:class:`~xqtool.tasks.injected.Injected` (``feature_extractor``). Statistics files are read and written by
:mod:`xqtool.fid_stats`; the distances are :mod:`xqtool.metrics`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xqtool import __version__
from xqtool.errors import ConfigError, DataError, WeightsMissingError
from xqtool.fid_stats import (
    FeatureSet,
    custom_stats_targets,
    load_custom_stats,
    save_custom_stats,
    stats_from_npz,
)
from xqtool.fsutil import atomic_path, atomic_write_text, check_output, fresh_output_dir, output_lock
from xqtool.metrics import (
    FID_MODES,
    class_probs,
    extractor_name,
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_extractor,
    inception_score,
    kernel_inception_distance,
    run_extractor,
)
from xqtool.tasks.injected import Injected

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy"}

NATIVE_PREPROCESSING = "RGB (alpha over white) at native resolution; no crop"


# ----------------------------------------------------------------------------------------------
# Feature sets
# ----------------------------------------------------------------------------------------------


def _adm_text(size: int) -> str:
    """The data layer's eval preprocessing text with S filled in."""
    import re

    from xqtool.data.transforms import eval_preprocessing

    text = eval_preprocessing().replace("2S", str(2 * size)).replace("SxS", f"{size}x{size}")
    return re.sub(r"\bS\b", str(size), text)


def _preprocessing_text(image_size: Optional[int], extractor: Any) -> str:
    base = NATIVE_PREPROCESSING if image_size is None else _adm_text(image_size).split("; x/127.5")[0]
    mode = getattr(extractor, "mode", None)
    inside = {
        "clean": "clean-fid clean: PIL bicubic (float, antialiased) to 299x299",
        "legacy_tensorflow": "clean-fid legacy_tensorflow: TF-style bilinear resize inside the network",
        "legacy_pytorch": "clean-fid legacy_pytorch: torch bilinear (align_corners=False) to 299x299",
    }.get(mode or "", "extractor-defined")
    return f"{base}; uint8 [0,255] -> {inside}"


class _ImageFiles(Dataset):
    """Image files → float tensors ``[3, h, w]`` with values in [0, 255] after ``preprocess``."""

    def __init__(self, files: Sequence[Path], preprocess: Optional[Callable], image_size: Optional[int]):
        self.files = list(files)
        self.preprocess = preprocess
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from xqtool.data.reading import decode_image
        from xqtool.data.transforms import center_crop_arr, to_rgb

        path = self.files[i]
        try:
            if path.suffix.lower() == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                img = to_rgb(decode_image(path.read_bytes()))  # EXIF orientation, exact 16-bit scaling
                arr = center_crop_arr(img, self.image_size) if self.image_size else np.asarray(img)
        except Exception as exc:  # noqa: BLE001 - unreadable input is a user/data error
            raise DataError(f"cannot read image {path}: {exc}".splitlines()[0]) from None
        return _to_item(arr, self.preprocess, self.image_size)


class _ImageArray(Dataset):
    """uint8 array ``[N, H, W, 3]`` → float tensors ``[3, h, w]`` in [0, 255] after ``preprocess``."""

    def __init__(self, arr: np.ndarray, preprocess: Optional[Callable], image_size: Optional[int]):
        self.arr = arr
        self.preprocess = preprocess
        self.image_size = image_size

    def __len__(self) -> int:
        return int(self.arr.shape[0])

    def __getitem__(self, i: int):
        arr = np.asarray(self.arr[i])
        if self.image_size and arr.shape[:2] != (self.image_size, self.image_size):
            from PIL import Image

            from xqtool.data.transforms import center_crop_arr

            arr = center_crop_arr(Image.fromarray(arr), self.image_size)
        return _to_item(arr, self.preprocess, self.image_size)


def _to_item(arr: np.ndarray, preprocess: Optional[Callable], image_size: Optional[int]):
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"expected RGB images [H, W, 3], got an array of shape {arr.shape}")
    size = f"{arr.shape[0]}x{arr.shape[1]}"
    if preprocess is not None:
        arr = preprocess(arr)
    t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float()
    return t, size


def _list_images(folder: Path) -> List[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"no images found in {folder} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def extract_features(
    dataset: Dataset,
    extractor: Any,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    want_probs: bool = True,
) -> tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """Run `extractor` over a dataset of (image [3,h,w] in [0,255], "HxW") → (features [N,F], probs|None, sizes)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    feats, probs, sizes = [], [], set()
    it = iter(loader)
    while True:
        try:
            images, batch_sizes = next(it)
        except StopIteration:
            break
        except RuntimeError as exc:
            if "stack expects each tensor to be equal size" in str(exc) or "equal size" in str(exc):
                raise DataError(
                    "images have different sizes and this feature extractor does not resize: "
                    "pass --image-size S (ADM center crop) or use --mode clean"
                ) from None
            raise
        f = run_extractor(extractor, images)
        feats.append(f.numpy().astype(np.float64))
        p = class_probs(extractor, f) if want_probs else None
        if p is not None:
            probs.append(p)
        sizes.update(batch_sizes)
    if not feats:
        raise DataError("no images to evaluate")
    return np.concatenate(feats), (np.concatenate(probs) if len(probs) == len(feats) else None), sorted(sizes)


@dataclass(kw_only=True)
class FeatureOptions:
    """How images are read and turned into features (shared by ``eval-fid`` and ``make-fid-stats``).

    Attributes:
        mode: clean-fid mode ``clean | legacy_tensorflow | legacy_pytorch`` (Inception preprocessing).
        device: where the extractor runs; inception_weights: local Inception file or folder (never downloaded).
        max_images: use only the first N images of each side (None = all).
        image_size: ADM center crop of every image to S×S before feature extraction (None = native size).
        stats_dir: folder of custom statistics (None = ``$XQTOOL_FID_STATS_DIR``, else clean-fid's folder).
    """

    mode: str = "clean"
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    inception_weights: Optional[PathLike] = None
    max_images: Optional[int] = None
    image_size: Optional[int] = None
    stats_dir: Optional[PathLike] = None

    def extractor(self, injected: Injected) -> Any:
        """The injected feature extractor, else clean-fid's Inception for `mode` (WeightsMissingError offline)."""
        if injected.feature_extractor is not None:
            return injected.feature_extractor
        return inception_extractor(self.inception_weights, device=self.device, mode=self.mode)


@dataclass(kw_only=True)
class FidSettings(FeatureOptions):
    """What ``xqtool eval-fid GEN REF`` compares and reports (see :func:`evaluate_fid`).

    Attributes:
        gen, ref: folder / images ``.npz`` / stats ``.npz`` (module docstring); exactly one of `ref`, `ref_stats`.
        ref_stats: custom statistics NAME made by :func:`make_fid_stats`.
        use_npz_stats: for an ``.npz`` with both images and mu/sigma, use the stored statistics.
        kid / inception_score: also compute KID ([N, F] features on both sides needed) / the IS of GEN.
        report_path: JSON report destination (None = do not write); overwrite: replace an earlier report.
    """

    gen: PathLike
    ref: Optional[PathLike] = None
    ref_stats: Optional[str] = None
    use_npz_stats: bool = False
    kid: bool = True
    inception_score: bool = True
    kid_subsets: int = 100
    is_splits: int = 10
    seed: int = 0
    report_path: Optional[PathLike] = "fid_report.json"
    overwrite: bool = False


@dataclass(kw_only=True)
class FidStatsSettings(FeatureOptions):
    """What ``xqtool make-fid-stats SOURCE --name NAME`` saves (see :func:`make_fid_stats`).

    Attributes:
        source: folder of images or images ``.npz``; name: statistics name (letters, digits, '-', '_').
        overwrite: replace existing statistics ``name`` (only ones xqtool wrote).
    """

    source: PathLike
    name: str
    overwrite: bool = False


@dataclass(kw_only=True)
class RfidSettings(FeatureOptions):
    """What ``xqtool eval-fid --rfid TOKENIZER DATA`` reconstructs and reports (see :func:`evaluate_rfid`).

    Attributes:
        tokenizer: xqtool checkpoint dir, official ``.pt`` or model name (unused when ``Injected.tokenizer`` is set).
        data: any image source the data layer accepts (folder, class tree, list file, WebDataset shards).
        config: YAML config for an official checkpoint without usable ``args``; prefer_ema: EMA weights when saved.
        lpips: ``auto`` (compute when weights are found), ``on`` (error when missing) or ``off``; lpips_weights: file.
        bad_files: ``skip`` (count and report) or ``error``.
        kid / kid_subsets / seed: KID on both feature sets (subset draws seeded).
        save_recon: optional folder for the reconstructions as PNG (``<index>.png``).
        report_path: JSON report destination (None = do not write); overwrite: replace earlier xqtool outputs.
    ``image_size`` and ``stats_dir`` of :class:`FeatureOptions` are not used (images are cropped to the
    tokenizer's size).
    """

    tokenizer: Optional[PathLike]
    data: PathLike
    config: Optional[PathLike] = None
    prefer_ema: bool = True
    batch_size: int = 32
    lpips: str = "auto"
    lpips_weights: Optional[PathLike] = None
    bad_files: str = "skip"
    kid: bool = True
    kid_subsets: int = 100
    seed: int = 0
    save_recon: Optional[PathLike] = None
    report_path: Optional[PathLike] = "rfid_report.json"
    overwrite: bool = False


def load_feature_set(
    path: PathLike,
    extractor: Any,
    options: Optional[FeatureOptions] = None,
    *,
    use_npz_stats: bool = False,
    want_probs: bool = True,
) -> FeatureSet:
    """Features or statistics of a folder / images ``.npz`` / statistics ``.npz`` (see module docstring).

    `options` gives batch size, workers, ``max_images`` and the ADM crop ``image_size`` (defaults when None).
    Raises DataError for a missing, unreadable or unsuitable input.
    """
    o = options or FeatureOptions()
    p = Path(path).expanduser()
    preprocess = getattr(extractor, "preprocess", None)
    prep = _preprocessing_text(o.image_size, extractor)
    if p.is_dir():
        files = _list_images(p)[: o.max_images or None]
        ds: Dataset = _ImageFiles(files, preprocess, o.image_size)
        kind = "folder"
    elif p.is_file() and p.suffix == ".npz":
        try:
            z = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read {p}: {exc}".splitlines()[0]) from None
        has_stats = "mu" in z.files and "sigma" in z.files
        has_images = "arr_0" in z.files and z["arr_0"].ndim == 4
        if has_stats and (use_npz_stats or not has_images):
            return stats_from_npz(p, z)
        if not has_images:
            raise DataError(f"{p} has neither images 'arr_0' [N,H,W,3] nor statistics 'mu'/'sigma'")
        arr = z["arr_0"]
        if arr.dtype != np.uint8:
            raise DataError(f"{p}: 'arr_0' must be uint8 images [N, H, W, 3], got {arr.dtype}")
        if o.max_images:
            arr = arr[: o.max_images]
        ds = _ImageArray(arr, preprocess, o.image_size)
        kind = "npz-images"
    elif not p.exists():
        raise DataError(f"FID input not found: {p}")
    else:
        raise DataError(f"FID input {p} must be a folder of images or an .npz (images 'arr_0' or 'mu'/'sigma')")
    feats, probs, sizes = extract_features(
        ds, extractor, batch_size=o.batch_size, num_workers=o.num_workers, want_probs=want_probs
    )
    mu, sigma = feature_stats(feats)
    return FeatureSet(kind, str(p.resolve()), feats.shape[0], mu, sigma, feats, probs, sizes, prep)


def make_fid_stats(settings: FidStatsSettings, injected: Optional[Injected] = None) -> Dict[str, Any]:
    """Compute and save custom FID statistics ``settings.name`` of ``settings.source`` (folder or images ``.npz``).

    Writes clean-fid's files through :func:`xqtool.fid_stats.save_custom_stats`, with an ``xqtool_meta`` entry
    (extractor, mode, count, preprocessing). Uses ``injected.feature_extractor`` when given. Returns a summary
    dict (name, mode, stats_path, kid_path and the meta entries). Raises ConfigError (bad mode or name),
    DataError (statistics exist without ``overwrite``; a statistics-only source), OutputError.
    """
    s = settings
    _check_mode(s.mode)
    fid_path, kid_path = custom_stats_targets(s.name, s.mode, s.stats_dir, s.overwrite)
    extractor = s.extractor(injected or Injected())
    fs = load_feature_set(s.source, extractor, s, want_probs=False)
    if fs.feats is None:
        raise DataError(f"{s.source} holds only statistics; make-stats needs images")
    meta = {
        "count": fs.count,
        "extractor": extractor_name(extractor),
        "mode": s.mode,
        "sizes": fs.sizes,
        "preprocessing": fs.preprocessing,
        "source": fs.path,
        "xqtool_version": __version__,
    }
    save_custom_stats(fid_path, kid_path, fs, meta)
    return {"name": s.name, "mode": s.mode, "stats_path": str(fid_path), "kid_path": str(kid_path), **meta}


def _check_meta_matches(fs: FeatureSet, extractor: Any) -> None:
    """ConfigError when stored statistics name another extractor than the one in use."""
    if fs.extractor and fs.extractor != extractor_name(extractor):
        raise ConfigError(
            f"statistics {fs.path} were made with '{fs.extractor}', not '{extractor_name(extractor)}': "
            "use the same --mode (and extractor) on both sides"
        )


# ----------------------------------------------------------------------------------------------
# FID between two sets
# ----------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in FID_MODES:
        raise ConfigError(f"unknown --mode '{mode}': use one of {', '.join(FID_MODES)}")


def _distribution_metrics(
    gen: FeatureSet, ref: FeatureSet, *, kid: bool, isc: bool, kid_subsets: int, is_splits: int, seed: int
) -> Dict[str, Any]:
    if gen.feats is not None and ref.feats is not None:
        fid = fid_from_features(gen.feats, ref.feats)
    else:
        fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    out: Dict[str, Any] = {"fid": fid}
    if kid and gen.feats is not None and ref.feats is not None:
        out["kid"] = kernel_inception_distance(gen.feats, ref.feats, num_subsets=kid_subsets, seed=seed)
    else:
        out["kid"] = None
    if isc and gen.probs is not None:
        m, s = inception_score(gen.probs, splits=is_splits)
        out["inception_score"], out["inception_score_std"] = m, s
    else:
        out["inception_score"], out["inception_score_std"] = None, None
    return out


def _backend(extractor: Any, mode: Optional[str], injected: bool) -> Dict[str, Any]:
    try:
        from importlib.metadata import version

        cf = version("clean-fid")
    except Exception:  # noqa: BLE001
        cf = "unknown"
    return {
        "library": f"clean-fid {cf}",
        "feature_extractor": extractor_name(extractor),
        "injected_extractor": injected,
        "mode": mode,
        "weights": getattr(extractor, "weights_path", None),
    }


def _is_report(path: Path) -> bool:
    """An earlier xqtool evaluation report (JSON object with ``metrics``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "metrics" in data


def check_report_path(report_path: Optional[PathLike], overwrite: bool, sources: Sequence[Any] = ()) -> None:
    """OutputError before any work when the report exists (``overwrite`` replaces only an earlier report)."""
    if report_path is not None:
        check_output(Path(report_path).expanduser(), kind="eval report", is_dir=False, overwrite=overwrite,
                     ours=_is_report, sources=sources)


def _write_report(report: Dict[str, Any], report_path: Optional[PathLike]) -> Dict[str, Any]:
    if report_path is not None:
        rp = Path(report_path).expanduser()
        report["report_path"] = str(rp.resolve())
        atomic_write_text(rp, json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")
    return report


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def evaluate_fid(settings: FidSettings, injected: Optional[Injected] = None) -> Dict[str, Any]:
    """FID (+ KID, Inception Score of GEN) between ``settings.gen`` and ``settings.ref`` (or custom statistics
    ``settings.ref_stats``), with ``injected.feature_extractor`` (tests) or clean-fid's Inception.

    The report path is checked before any work: OutputError when it exists (``overwrite`` replaces only an
    earlier xqtool report) or is locked by another process. ConfigError for a bad mode, not exactly one
    reference, or custom statistics made with another extractor.

    Returns:
        The report dict (``metrics``: fid, kid, inception_score, inception_score_std; ``backend``; ``gen``/``ref``
        descriptions with counts, sizes, preprocessing and paths; ``xqtool_version``; ...).
    """
    s = settings
    _check_mode(s.mode)
    check_report_path(s.report_path, s.overwrite, [s.gen] + ([s.ref] if s.ref is not None else []))
    with output_lock(Path(str(s.report_path or "report")).expanduser(), enabled=s.report_path is not None):
        return _evaluate_fid(s, injected or Injected())


def _evaluate_fid(s: FidSettings, injected: Injected) -> Dict[str, Any]:
    if (s.ref is None) == (s.ref_stats is None):
        raise ConfigError("give exactly one reference: REF (folder / .npz) or --ref-stats NAME")
    for side in (s.gen, s.ref):  # a typo in a path is reported before Inception is loaded
        if side is not None and not Path(side).expanduser().exists():
            raise DataError(f"FID input not found: {side}")
    extractor = s.extractor(injected)
    gen_set = load_feature_set(s.gen, extractor, s, use_npz_stats=s.use_npz_stats, want_probs=s.inception_score)
    if s.ref_stats is not None:
        ref_set = load_custom_stats(s.ref_stats, s.mode, s.stats_dir)
        _check_meta_matches(ref_set, extractor)
    else:
        ref_set = load_feature_set(s.ref, extractor, s, use_npz_stats=s.use_npz_stats, want_probs=False)
    metrics = _distribution_metrics(gen_set, ref_set, kid=s.kid, isc=s.inception_score, kid_subsets=s.kid_subsets,
                                    is_splits=s.is_splits, seed=s.seed)
    notes = []
    if gen_set.count >= 0 and gen_set.count < 10000:
        notes.append(f"only {gen_set.count} generated images: FID is biased upwards for small sets (papers use 50k)")
    if gen_set.sizes and ref_set.sizes and set(gen_set.sizes) != set(ref_set.sizes):
        what = f"statistics '{s.ref_stats}'" if s.ref_stats else "reference"
        msg = (f"resolution mismatch: generated images are {', '.join(gen_set.sizes)} but the {what} were made at "
               f"{', '.join(ref_set.sizes)}: FID across resolutions is not comparable (use --image-size)")
        log.warning(msg)
        notes.append(msg)
    if "stats" in (gen_set.kind, ref_set.kind) and ref_set.kind != "custom-stats":
        notes.append("precomputed mu/sigma were used: they are only comparable if made with the same extractor/mode")
    injected_fx = injected.feature_extractor is not None
    report = {
        "task": "fid",
        "metrics": metrics,
        "backend": _backend(extractor, getattr(extractor, "mode", s.mode) if injected_fx else s.mode, injected_fx),
        "gen": gen_set.describe(),
        "ref": ref_set.describe() | ({"name": s.ref_stats} if s.ref_stats else {}),
        "image_counts": {"gen": gen_set.count, "ref": ref_set.count},
        "resolution": {"gen": gen_set.sizes, "ref": ref_set.sizes, "center_crop": s.image_size},
        "preprocessing": gen_set.preprocessing,
        "settings": {
            "batch_size": s.batch_size, "max_images": s.max_images, "kid_subsets": s.kid_subsets,
            "is_splits": s.is_splits, "seed": s.seed, "use_npz_stats": s.use_npz_stats, "device": str(s.device),
        },
        "notes": notes,
        "xqtool_version": __version__,
        "created": _now(),
    }
    return _write_report(report, s.report_path)


# ----------------------------------------------------------------------------------------------
# Reconstruction metrics (rFID) of a tokenizer
# ----------------------------------------------------------------------------------------------


def _resolve_lpips(lpips: str, lpips_weights: Optional[PathLike], injected_lpips: Any, device: str):
    """→ (module or None, description)."""
    if injected_lpips is not None:
        return injected_lpips, "injected"
    if lpips == "off":
        return None, "disabled"
    from xqtool.losses.lpips import LPIPS

    try:
        net = LPIPS(weights=lpips_weights)
    except WeightsMissingError:
        if lpips == "on" or lpips_weights is not None:
            raise
        log.warning("LPIPS weights not found: LPIPS is skipped (give --lpips-weights PATH or set XQTOOL_LPIPS_WEIGHTS)")
        return None, "skipped: weights not found"
    return net.to(device), f"LPIPS-VGG16 ({net.source})"


def evaluate_rfid(s: RfidSettings, injected: Optional[Injected] = None) -> Dict[str, Any]:
    """Reconstruct ``s.data`` through a tokenizer and score against the originals in one pass.

    Originals and reconstructions are both quantised to uint8 (``round(127.5 x + 127.5)``, clamped) before
    every metric, exactly as if both were saved as PNG. Images come from ``xqtool.data.images.make_loader``
    (ADM center crop to the tokenizer's image size); the loop is :class:`xqtool.evaluation.ReconstructionEvaluator`,
    the one training validation uses.

    `injected` may give ``tokenizer``, ``feature_extractor`` and ``lpips`` (a callable ``(x, y) -> [B]`` on images
    in [-1, 1]) instead of loading them.

    Returns:
        The report dict (``metrics``: rfid, kid, psnr, ssim, lpips, codebook usage/perplexity per branch).
    Raises:
        OutputError: the report file or the ``save_recon`` folder exists (``overwrite`` replaces only earlier
            xqtool outputs), lies inside the data, or is locked by another process — checked before any work.
        ConfigError: bad ``mode`` / ``lpips``; DataError: fewer than 2 readable images; WeightsMissingError:
            Inception (or LPIPS with ``lpips=on``) weights missing.
    """
    injected = injected or Injected()
    check_report_path(s.report_path, s.overwrite, [s.data])
    with contextlib.ExitStack() as guard:
        if s.report_path is not None:
            guard.enter_context(output_lock(Path(s.report_path).expanduser()))
        if s.save_recon:
            replace = check_output(Path(s.save_recon), kind="rfid-recon", is_dir=True, overwrite=s.overwrite,
                                   sources=[s.data])
            guard.enter_context(output_lock(Path(s.save_recon)))
            guard.enter_context(fresh_output_dir(Path(s.save_recon), "rfid-recon", replace=replace))
        return _evaluate_rfid(s, injected)


def _evaluate_rfid(s: RfidSettings, injected: Injected) -> Dict[str, Any]:
    from xqtool.checkpoints import load_tokenizer
    from xqtool.data.images import make_loader
    from xqtool.data.sources import looks_like_shards
    from xqtool.evaluation import ReconstructionEvaluator
    from xqtool.metrics import from_uint8

    _check_mode(s.mode)
    if s.lpips not in ("auto", "on", "off"):
        raise ConfigError(f"--lpips must be auto, on or off, not '{s.lpips}'")
    device, data = s.device, s.data
    if not looks_like_shards(str(data)) and not Path(str(data)).expanduser().exists():
        raise DataError(f"image source not found: {data}")  # before any model is loaded (the loader walks it later)
    recon_dir = Path(s.save_recon) if s.save_recon else None
    tok = injected.tokenizer
    if tok is None:
        tok = load_tokenizer(s.tokenizer, config=s.config, map_location=device, prefer_ema=s.prefer_ema)
    tok = tok.to(device).eval()
    extractor = s.extractor(injected)
    lp, lp_desc = _resolve_lpips(s.lpips, s.lpips_weights, injected.lpips, device)
    S = int(tok.image_size)
    loader = make_loader(str(data), image_size=S, batch_size=s.batch_size, num_workers=s.num_workers,
                         bad_files=s.bad_files, seed=s.seed)
    ev = ReconstructionEvaluator(tok, device=device, uint8_metrics=True, extractor=extractor, limit=s.max_images)
    p_fake, lps = [], []
    for b in ev.batches(batch["image"] for batch in loader):
        if lp is not None:
            with torch.no_grad():
                lps.append(lp(from_uint8(b.x_u8).to(device), from_uint8(b.recon_u8).to(device)).float().cpu())
        probs = class_probs(extractor, b.feats_fake)
        if probs is not None:
            p_fake.append(probs)
        if recon_dir is not None:
            _save_pngs(recon_dir, b.recon_u8, start=ev.seen - b.x.shape[0])
    n = ev.seen
    if n < 2:
        raise DataError(f"rFID needs at least 2 images, {data} gave {n}")
    real_feats = torch.cat(ev.feats_real).numpy().astype(np.float64)
    real = FeatureSet("originals", str(Path(str(data)).resolve()) if Path(str(data)).exists() else str(data), n,
                      *feature_stats(real_feats), feats=real_feats, sizes=[f"{S}x{S}"])
    fake_feats = torch.cat(ev.feats_fake).numpy().astype(np.float64)
    fake = FeatureSet("reconstructions", str(recon_dir or ""), n, *feature_stats(fake_feats), feats=fake_feats,
                      probs=np.concatenate(p_fake) if len(p_fake) == len(ev.feats_fake) else None, sizes=[f"{S}x{S}"])
    dist = _distribution_metrics(fake, real, kid=s.kid, isc=True, kid_subsets=s.kid_subsets, is_splits=10, seed=s.seed)
    usage = ev.usage()
    metrics = {
        "rfid": dist["fid"],
        "kid": dist["kid"],
        "inception_score": dist["inception_score"],
        "psnr": float(torch.cat(ev.psnr).mean()),
        "ssim": float(torch.cat(ev.ssim).mean()),
        "lpips": float(torch.cat(lps).mean()) if lps else None,
        **usage,  # codebook_usage [P], codebook_usage_per_scale [P][S], codes_used ..., see metrics.py
    }
    try:
        chash = tok.config_hash()
    except Exception:  # noqa: BLE001 - injected toy tokenizers may have no config
        chash = None
    report = {
        "task": "rfid",
        "metrics": metrics,
        "backend": _backend(extractor, s.mode if injected.feature_extractor is None else getattr(extractor, "mode", s.mode),
                            injected.feature_extractor is not None),
        "checkpoint": str(Path(s.tokenizer).resolve()) if s.tokenizer is not None and injected.tokenizer is None else (
            str(s.tokenizer) if s.tokenizer is not None else None),
        "config_hash": chash,
        "prefer_ema": s.prefer_ema,
        "data": real.path,
        "image_counts": {"originals": n, "reconstructions": n, "skipped_bad_files": len(loader.bad_files)},
        "bad_files": dict(list(loader.bad_files.items())[:50]),
        "resolution": {"image_size": S},
        "preprocessing": f"{_adm_text(S)}; originals and reconstructions quantised to "
                         f"uint8 round(127.5x+127.5) before all metrics; "
                         + _preprocessing_text(None, extractor).split("; ", 1)[1],
        "metric_definitions": {
            "psnr": "dB on the [0,1] scale (== uint8 / 255), per image then mean; capped at 100 dB",
            "ssim": "Gaussian 11x11 sigma 1.5, per channel, mean over images",
            "lpips": lp_desc,
        },
        "settings": {"batch_size": s.batch_size, "max_images": s.max_images, "seed": s.seed, "device": str(device),
                     "mode": s.mode, "bad_files": s.bad_files},
        "recon_dir": str(recon_dir.resolve()) if recon_dir else None,
        "notes": ([f"only {n} images: rFID is biased upwards for small sets (papers use 50k ImageNet val)"]
                  if n < 10000 else []),
        "xqtool_version": __version__,
        "created": _now(),
    }
    return _write_report(report, s.report_path)


def _save_pngs(folder: Path, images_u8: torch.Tensor, start: int) -> None:
    from PIL import Image

    for i, im in enumerate(images_u8):
        with atomic_path(folder / f"{start + i:06d}.png") as tmp:
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


__all__ = [
    "FeatureOptions",
    "FidSettings",
    "FidStatsSettings",
    "RfidSettings",
    "evaluate_fid",
    "evaluate_rfid",
    "make_fid_stats",
    "load_feature_set",
    "extract_features",
]
