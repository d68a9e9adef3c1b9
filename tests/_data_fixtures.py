"""Helpers for the data-layer tests: small real images (scikit-image) laid out as every kind of source."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import webdataset as wds
from PIL import Image


def photo_crops(n: int, size: Tuple[int, int] = (48, 64)) -> List[np.ndarray]:
    """n distinct uint8 RGB crops [h, w, 3] of scikit-image's astronaut / coffee / chelsea photos."""
    import skimage.data as sd

    photos = [sd.astronaut(), sd.coffee(), sd.chelsea()]
    h, w = size
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        step = 4 + (i // len(photos)) % 3
        y = (i * 17) % (p.shape[0] - h * step)
        x = (i * 29) % (p.shape[1] - w * step)
        out.append(np.ascontiguousarray(p[y : y + h * step : step, x : x + w * step : step]))
    return out


def write_class_tree(root: Path, per_class: int = 3, classes: Tuple[str, ...] = ("cat", "dog")) -> Dict[str, int]:
    """root/<class>/<i>.png from photo crops -> {key: label}."""
    crops = photo_crops(per_class * len(classes))
    keys = {}
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(crops[ci * per_class + i]).save(root / c / f"img{i}.png")
            keys[f"{c}/img{i}"] = ci
    return keys


def write_file_list(list_path: Path, root: Path, keys: Dict[str, int], with_labels: bool = True) -> None:
    """A .txt list of root/<key>.png (absolute paths), optionally followed by the label."""
    lines = [f"{root / (k + '.png')}" + (f" {v}" if with_labels else "") for k, v in keys.items()]
    list_path.write_text("# images\n" + "\n".join(lines) + "\n")


def png_bytes(arr: np.ndarray, mode: str = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: List[Dict[str, bytes]]) -> None:
    """Write raw samples ({'__key__': str, ext: bytes}) to a tar with webdataset's TarWriter."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)


def shard_sample(key: str, arr: np.ndarray, label: int, ext: str = "png") -> Dict[str, bytes]:
    return {
        "__key__": key,
        ext: png_bytes(arr),
        "cls": str(label).encode(),
        "json": json.dumps({"key": key}).encode(),
    }
