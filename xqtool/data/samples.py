"""Built-in demo images: real photos that ship with scikit-image, cut into a small class-tree dataset.

Used when a config leaves ``data.data_path`` empty, by the README quick start, and by tests.
No network: only `skimage.data` images bundled in the scikit-image wheel are used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from xqtool.errors import DataError
from xqtool.fsutil import OUTPUT_MARKER, atomic_dir, check_output, has_marker, output_lock, write_marker

logger = logging.getLogger(__name__)

# Bundled (offline) colour photos of scikit-image, grouped into classes.
DEMO_CLASSES: Dict[str, Tuple[str, ...]] = {
    "animal": ("chelsea", "cat"),
    "person": ("astronaut",),
    "object": ("coffee", "rocket"),
    "science": ("hubble_deep_field", "immunohistochemistry", "retina"),
}


def _load(name: str) -> np.ndarray:
    from skimage import data

    try:
        img = getattr(data, name)()
    except Exception as exc:  # some skimage images download on first use; those are not offline
        raise DataError(f"scikit-image sample '{name}' is not available offline ({type(exc).__name__})") from None
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def demo_crops(name: str, count: int, size: int, rng: np.random.Generator) -> list:
    """`count` random square crops (random scale, optional flip) of sample `name`, resized to `size`."""
    from PIL import Image

    img = _load(name)
    h, w = img.shape[:2]
    out = []
    for _ in range(count):
        side = int(rng.integers(max(16, min(h, w) // 4), min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def _is_demo(root: Path) -> bool:
    """An earlier demo-images folder: the marker, or (older xqtool) exactly train/ and val/ of demo classes."""
    if has_marker(root, "demo-images"):
        return True
    names = {p.name for p in root.iterdir()} - {OUTPUT_MARKER}
    return names == {"train", "val"} and all((root / s).is_dir() for s in ("train", "val")) and all(
        {c.name for c in (root / s).iterdir()} <= set(DEMO_CLASSES) for s in ("train", "val"))


def write_demo_images(root: Path, per_class: int = 48, val_per_class: int = 8, size: int = 64, seed: int = 0,
                      progress: Optional[Callable[[int], None]] = None, overwrite: bool = False) -> Tuple[Path, Path]:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (atomically); return both dirs.

    ``progress(n)`` is called after every written image (total: ``(per_class + val_per_class) * len(DEMO_CLASSES)``).
    OutputError when `root` exists and is not empty, unless ``overwrite`` and it is an earlier demo-images folder.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    replace = check_output(root, kind="demo-images", is_dir=True, overwrite=overwrite, ours=_is_demo)
    with output_lock(root), atomic_dir(root, replace=replace) as tmp:
        write_marker(tmp, "demo-images")
        for split, n in (("train", per_class), ("val", val_per_class)):
            for cls, names in DEMO_CLASSES.items():
                folder = tmp / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    name = names[i % len(names)]
                    (crop,) = demo_crops(name, 1, size, rng)
                    crop.save(folder / f"{name}_{i:04d}.png")
                    if progress is not None:
                        progress(1)
    return root / "train", root / "val"


def ensure_demo_images(root: Path, size: int = 64) -> Tuple[Path, Path]:
    """Reuse ``root`` if it already holds demo images, else write them; return (train_dir, val_dir)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train", root / "val"
    logger.info("writing scikit-image demo images to %s", root)
    return write_demo_images(root, size=size)


def sample_photo_folder(root: Path, image_size: int) -> Tuple[Path, Path]:
    """Demo dataset for training at `image_size` px: photo crops of ``max(2·image_size, 64)`` px under
    ``root/{train,val}`` (written once); returns both dirs.

    Used when ``data.data_path`` is null, so demos and tests run offline on real images.
    """
    return ensure_demo_images(root, size=max(2 * image_size, 64))
