"""`xqtool make-shards`: pack any image source into WebDataset shards.

Each sample: ``__key__`` (source key, dots -> '_'), ``jpg`` (JPEG, quality 95) or ``png`` (lossless),
``cls`` (label, -1 when unknown) and ``json`` (``key``, ``path``, ``label``, ``original_width``,
``original_height``, ``original_mode``). Images keep their original size (RGB-converted); JPEG/PNG files
that are already RGB in the requested format are copied byte for byte. The folder also gets
``shards.json`` (shard names and counts) and, when inputs were skipped, ``skipped.txt``. The whole
folder appears atomically when done.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import webdataset as wds
from PIL import Image

from xqtool.data.images import check_policy, process_records
from xqtool.data.shards import shard_key, warn_if_few_shards
from xqtool.data.sources import SourceLike, file_records, resolve_source
from xqtool.data.shards import iter_shard_records
from xqtool.data.transforms import to_rgb
from xqtool.errors import DataError
from xqtool.fsutil import atomic_dir, check_output, output_lock

log = logging.getLogger(__name__)

FORMATS = {"jpg": "JPEG", "png": "PNG"}


@dataclass
class MakeShardsResult:
    """Outcome of :func:`make_shards`."""

    out_dir: Path
    shards: List[Tuple[str, int]]
    count: int
    skipped: Dict[str, str] = field(default_factory=dict)
    warning: Optional[str] = None


def _encode(img: Image.Image, raw: bytes, image_format: str, quality: int) -> bytes:
    fmt = FORMATS[image_format]
    if img.mode == "RGB" and img.format == fmt:
        return raw
    buf = io.BytesIO()
    rgb = to_rgb(img)
    if fmt == "JPEG":
        rgb.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 95 else 2)
    else:
        rgb.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def make_shards(
    source: SourceLike,
    out_dir: Path,
    *,
    maxcount: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    prefix: str = "shard",
    bad_files: str = "skip",
    nodes: int = 1,
    workers: int = 1,
    progress: Optional[Callable[[int], None]] = None,
    overwrite: bool = False,
) -> MakeShardsResult:
    """Pack `source` into ``out_dir/{prefix}-000000.tar`` ... with at most `maxcount` samples each.

    Returns the shard names and counts; warns (``result.warning``) when there are fewer shards than
    ``nodes * workers`` readers. Raises DataError for an empty source or (policy ``fail``) a bad input, and
    OutputError when `out_dir` exists (``overwrite`` replaces only an earlier make-shards folder, recognised by
    its ``shards.json``), lies inside / contains the source, or is being written by another process.
    """
    if image_format not in FORMATS:
        raise DataError(f"--format must be jpg or png, not {image_format!r}")
    if maxcount < 1:
        raise DataError("--maxcount must be at least 1")
    check_policy(bad_files)
    out_dir = Path(out_dir)
    sources = [source] if isinstance(source, (str, Path)) else []
    replace = check_output(out_dir, kind="make-shards", is_dir=True, overwrite=overwrite,
                           ours=lambda p: (p / "shards.json").is_file(), sources=sources)
    with output_lock(out_dir):
        return _make_shards(source, out_dir, replace, maxcount=maxcount, image_format=image_format, quality=quality,
                            prefix=prefix, bad_files=bad_files, nodes=nodes, workers=workers, progress=progress)


def _make_shards(source: SourceLike, out_dir: Path, replace: bool, *, maxcount: int, image_format: str, quality: int,
                 prefix: str, bad_files: str, nodes: int, workers: int,
                 progress: Optional[Callable[[int], None]]) -> MakeShardsResult:
    spec = resolve_source(source)
    skipped: Dict[str, str] = {}
    counts: List[Tuple[str, int]] = []
    total = 0

    if spec.kind == "files":
        records = file_records(spec.items)
    else:
        records = (r for url in spec.urls for r in iter_shard_records(url))

    with atomic_dir(out_dir, replace=replace) as tmp:
        writer: Optional[wds.ShardWriter] = None

        def post(fname: str) -> None:
            assert writer is not None
            counts.append((Path(fname).name, writer.count))

        writer = wds.ShardWriter(
            str(tmp / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=float("inf"), post=post, verbose=0,
            encoder=False, format="PAX_FORMAT",
        )
        try:
            for rec, img in process_records(
                records, lambda im: im, bad_files=bad_files, on_bad=lambda n, r: skipped.__setitem__(n, r)
            ):
                ext = image_format
                meta = {
                    "key": rec.key,
                    "path": rec.name,
                    "label": int(rec.label),
                    "original_width": int(img.size[0]),
                    "original_height": int(img.size[1]),
                    "original_mode": img.mode,
                }
                if rec.meta:
                    meta["source_meta"] = rec.meta
                writer.write(
                    {
                        "__key__": shard_key(rec.key),
                        ext: _encode(img, rec.data or b"", image_format, quality),
                        "cls": str(int(rec.label)).encode("ascii"),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
                total += 1
                if progress is not None:
                    progress(1)
        finally:
            writer.close()
        if total == 0:
            raise DataError(f"no readable images in {spec.description} ({len(skipped)} bad inputs skipped)")
        counts = [(n, c) for n, c in counts if c > 0]
        for name in {p.name for p in tmp.glob("*.tar")} - {n for n, _ in counts}:
            (tmp / name).unlink()
        index = {
            "shards": [{"name": n, "count": c} for n, c in counts],
            "count": total,
            "format": image_format,
            "source": spec.description,
            "classes": spec.classes,
            "skipped": len(skipped),
        }
        (tmp / "shards.json").write_text(json.dumps(index, indent=1) + "\n")
        if skipped:
            (tmp / "skipped.txt").write_text("".join(f"{n}\t{r}\n" for n, r in sorted(skipped.items())))
    warning = warn_if_few_shards(len(counts), nodes, workers)
    return MakeShardsResult(out_dir, counts, total, skipped, warning)
