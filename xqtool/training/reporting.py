"""What a training run shows: reconstruction grids (PNG and tensorboard) and the tracker's flat config."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from xqtool.fsutil import atomic_path
from xqtool.metrics import to_uint8_hwc

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

GRID_MIN_TILE = 128  # px: small training images are upscaled (nearest) to at least this side
GRID_LABEL_H = 16
GRID_PAD = 2


def recon_grid(originals: Tensor, recons: Tensor, step: Optional[int] = None) -> "np.ndarray":
    """uint8 [H, W, 3] preview: a labelled band, the originals ``[n,3,S,S]``, a band, the reconstructions.

    Tiles are upscaled by the integer factor ``ceil(128 / S)`` (nearest neighbour, so pixels stay visible); the
    bands read ``original`` / ``reconstruction, step N``. Inputs are in [-1, 1].
    """
    import numpy as np
    from PIL import Image, ImageDraw

    n, _, h, w = originals.shape
    f = max(1, math.ceil(GRID_MIN_TILE / max(1, min(h, w))))
    th, tw = h * f, w * f
    width = n * (tw + GRID_PAD) + GRID_PAD
    height = 2 * (GRID_LABEL_H + th + GRID_PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    labels = ("original", "reconstruction" + (f", step {step}" if step is not None else ""))
    for r, (images, label) in enumerate(zip((originals, recons), labels)):
        y0 = r * (GRID_LABEL_H + th + GRID_PAD)
        draw.text((GRID_PAD + 2, y0 + 2), label, fill=(0, 0, 0))
        u8 = to_uint8_hwc(images)
        for i in range(n):
            tile = Image.fromarray(u8[i]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (GRID_PAD + i * (tw + GRID_PAD), y0 + GRID_LABEL_H))
    return np.asarray(canvas)


def save_grid(path: Path, originals: Tensor, recons: Tensor, step: Optional[int] = None) -> None:
    """Write :func:`recon_grid` as a PNG (atomically)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(recon_grid(originals, recons, step)).save(tmp, format="PNG")


def log_grid(acc: Any, tracker: str, grid: Tuple[Tensor, Tensor], step: int) -> None:
    """Originals over reconstructions as ``val/reconstructions`` in tensorboard (other trackers: nothing)."""
    if tracker != "tensorboard":
        return
    try:
        from torchvision.utils import make_grid

        tb = acc.get_tracker("tensorboard", unwrap=True)
        img = make_grid(torch.cat(grid).clamp(-1, 1) * 0.5 + 0.5, nrow=grid[0].shape[0])
        tb.add_image("val/reconstructions", img, step)
    except Exception as exc:  # pragma: no cover - logging must never stop training
        log.debug("could not log image: %s", exc)


def flat_config(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested config dict → ``{"section/key": scalar}`` (non-scalars as text), as trackers take hyperparameters."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


__all__ = ["flat_config", "log_grid", "recon_grid", "save_grid"]
