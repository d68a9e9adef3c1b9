"""FID statistics storage: reading and writing ``mu`` / ``sigma`` (and KID feature) files.

Owns the on-disk side of FID only; the distances themselves are computed in :mod:`xqtool.metrics` and the
evaluation flow lives in :mod:`xqtool.tasks.eval_fid`. Two kinds of files:

* a statistics ``.npz`` with ``mu`` ``[F]`` / ``sigma`` ``[F, F]`` (clean-fid custom stats, or an ADM reference
  batch), read by :func:`stats_from_npz`;
* clean-fid's custom statistics ``NAME``: ``{name}_{mode}_custom_na.npz`` (``mu``, ``sigma`` and an
  ``xqtool_meta`` JSON entry that clean-fid ignores) plus ``{name}_{mode}_custom_na_kid.npz`` (``feats``
  ``[N, F]`` float32 for KID), in ``stats_dir`` / ``$XQTOOL_FID_STATS_DIR`` / clean-fid's stats folder; written
  atomically by :func:`save_custom_stats`, read by :func:`load_custom_stats`. Same files as clean-fid's
  ``make_custom_stats``, so either tool reads the other's.

Imports only :mod:`xqtool.errors` and :mod:`xqtool.fsutil` (and clean-fid, lazily, for its stats folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from xqtool.errors import ConfigError, DataError
from xqtool.fsutil import atomic_path, check_output

PathLike = Union[str, os.PathLike]
STATS_ENV = "XQTOOL_FID_STATS_DIR"


@dataclass
class FeatureSet:
    """Features (or only statistics) of one side of an FID comparison.

    Attributes:
        kind: ``folder | npz-images | stats | custom-stats | reconstructions | originals``.
        mu, sigma: feature mean ``[F]`` and covariance ``[F, F]`` (float64).
        feats: features ``[N, F]`` (None for statistics-only inputs; KID needs them).
        probs: class probabilities ``[N, C]`` (Inception Score), when the extractor classifies.
        sizes: distinct ``"HxW"`` input sizes before the extractor.
        extractor: name of the extractor that made stored statistics ("" when unknown / not stored).
    """

    kind: str
    path: str
    count: int
    mu: np.ndarray
    sigma: np.ndarray
    feats: Optional[np.ndarray] = None
    probs: Optional[np.ndarray] = None
    sizes: List[str] = field(default_factory=list)
    preprocessing: str = ""
    extractor: str = ""

    def describe(self) -> Dict[str, Any]:
        """The report's description of this side: kind, path, count, sizes, preprocessing."""
        return {
            "kind": self.kind,
            "path": self.path,
            "count": self.count,
            "sizes": self.sizes,
            "preprocessing": self.preprocessing,
        }


def read_meta(z: Any) -> Dict[str, Any]:
    """The ``xqtool_meta`` JSON entry of an opened ``.npz`` (``{}`` when absent or unreadable)."""
    if "xqtool_meta" in z.files:
        try:
            return json.loads(str(z["xqtool_meta"]))
        except (ValueError, TypeError):
            return {}
    return {}


def stats_from_npz(path: Path, z: Any) -> FeatureSet:
    """The ``mu`` / ``sigma`` of an opened statistics ``.npz`` at `path` as a statistics-only set."""
    meta = read_meta(z)
    return FeatureSet(
        kind="stats",
        path=str(path.resolve()),
        count=int(meta.get("count", -1)),
        mu=np.asarray(z["mu"], dtype=np.float64),
        sigma=np.asarray(z["sigma"], dtype=np.float64),
        preprocessing=str(meta.get("preprocessing", "unknown (precomputed statistics)")),
        sizes=list(meta.get("sizes", [])),
        extractor=str(meta.get("extractor") or ""),
    )


def stats_dir_default(stats_dir: Optional[PathLike] = None) -> Path:
    """Where custom statistics live: `stats_dir`, else ``$XQTOOL_FID_STATS_DIR``, else clean-fid's stats folder."""
    if stats_dir is not None:
        return Path(stats_dir).expanduser()
    env = os.environ.get(STATS_ENV)
    if env:
        return Path(env).expanduser()
    import cleanfid

    return Path(cleanfid.__file__).parent / "stats"


def custom_stats_paths(name: str, mode: str, stats_dir: Optional[PathLike] = None) -> tuple[Path, Path]:
    """clean-fid's file names for custom stats: ``{name}_{mode}_custom_na.npz`` and ``..._kid.npz`` (lowercase)."""
    d = stats_dir_default(stats_dir)
    base = f"{name}_{mode}_custom_na".lower()
    return d / f"{base}.npz", d / f"{base}_kid.npz"


def load_custom_stats(name: str, mode: str, stats_dir: Optional[PathLike] = None) -> FeatureSet:
    """Load custom statistics ``name`` for ``mode`` (mu/sigma, and features for KID when present).

    Raises:
        DataError: no statistics file ``name`` for ``mode`` (the message says how to make it).
    """
    fid_path, kid_path = custom_stats_paths(name, mode, stats_dir)
    if not fid_path.is_file():
        raise DataError(
            f"no custom FID statistics '{name}' for mode '{mode}' at {fid_path}: "
            f"make them with `xqtool make-fid-stats DIR --name {name} --mode {mode}`"
        )
    with np.load(fid_path, allow_pickle=False) as z:
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        meta = read_meta(z)
    feats = None
    if kid_path.is_file():
        with np.load(kid_path, allow_pickle=False) as z:
            feats = np.asarray(z["feats"], np.float64) if "feats" in z.files else None
    return FeatureSet(
        kind="custom-stats",
        path=str(fid_path),
        count=int(meta.get("count", feats.shape[0] if feats is not None else -1)),
        mu=mu,
        sigma=sigma,
        feats=feats,
        sizes=list(meta.get("sizes", [])),
        preprocessing=str(meta.get("preprocessing", "unknown (clean-fid custom statistics)")),
        extractor=str(meta.get("extractor") or ""),
    )


def is_xqtool_stats(path: Path) -> bool:
    """Statistics written by xqtool: ``mu``/``sigma`` with ``xqtool_meta``, or KID ``feats`` beside such a file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "xqtool_meta" in z.files:
                return True
            if z.files != ["feats"]:
                return False
    except Exception:  # noqa: BLE001 - unreadable: not recognisably ours
        return False
    sibling = path.with_name(path.name.replace("_kid.npz", ".npz"))
    return sibling != path and is_xqtool_stats(sibling)


def custom_stats_targets(name: str, mode: str, stats_dir: Optional[PathLike], overwrite: bool) -> tuple[Path, Path]:
    """Check, before any work, that custom statistics ``name`` may be written -> their two paths.

    Raises:
        ConfigError: an invalid name (empty, or with a path separator or space).
        DataError: the statistics exist and `overwrite` is false.
        OutputError: a target exists that xqtool did not write, or is locked.
    """
    if not name or any(c in name for c in "/\\ "):
        raise ConfigError(f"invalid statistics name '{name}': use letters, digits, '-' or '_'")
    fid_path, kid_path = custom_stats_paths(name, mode, stats_dir)
    if fid_path.exists() and not overwrite:
        raise DataError(f"statistics '{name}' already exist at {fid_path}: pass --overwrite to replace them")
    for p in (fid_path, kid_path):
        check_output(p, kind="make-fid-stats", is_dir=False, overwrite=True, ours=is_xqtool_stats)
    return fid_path, kid_path


def save_custom_stats(fid_path: Path, kid_path: Path, fs: FeatureSet, meta: Dict[str, Any]) -> None:
    """Write `fs`'s ``mu``/``sigma`` (+ `meta` as ``xqtool_meta``) and its features ``feats`` (not None; float32,
    for KID) atomically."""
    fid_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(fid_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, mu=fs.mu, sigma=fs.sigma, xqtool_meta=np.array(json.dumps(meta)))
    with atomic_path(kid_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, feats=np.asarray(fs.feats).astype(np.float32))


__all__ = [
    "STATS_ENV",
    "FeatureSet",
    "read_meta",
    "stats_from_npz",
    "stats_dir_default",
    "custom_stats_paths",
    "custom_stats_targets",
    "load_custom_stats",
    "save_custom_stats",
    "is_xqtool_stats",
]
