"""Image bytes -> a PIL image as the user sees it (EXIF orientation, exact 16-bit scaling, size limits).

Every reader of the data layer (folders, lists, WebDataset members; train, encode, eval-fid, probe,
make-shards) goes through :func:`decode_image`. docs/data.md lists the conversion of each image kind:

* EXIF orientation (tag 0x0112, values 1..8) is applied with :func:`PIL.ImageOps.exif_transpose`
  unless ``ReadOptions.exif_transpose`` is False (``XQTOOL_EXIF_TRANSPOSE=0``), for bit-parity with
  pipelines that ignore EXIF.
* 16-bit images are scaled by their *mode*, never by their content: 8-bit value = round(v / 257).
  Grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` read from a 16-bit PNG) is scaled in
  :func:`xqtool.data.transforms.to_rgb`. 16-bit-per-channel colour (48-bit RGB / 64-bit RGBA PNG, 16-bit
  TIFF), which Pillow would truncate to the high byte, is decoded twice by Pillow's own decoder - once
  for the high and once for the low byte of each sample - and rounded here, so v = 256 * hi + lo exactly.
* 32-bit integer (``I`` not from a PNG) and float (``F``) images have no defined 8-bit scale and are
  refused by name (a bad input under the bad-file policy).
* Images whose long side exceeds ``max_aspect_ratio`` times the short side are refused by name before
  their pixels are decoded (``XQTOOL_MAX_ASPECT_RATIO``; 0 = no limit), as are decompression bombs.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Default aspect-ratio limit (long side / short side) of an input image.
DEFAULT_MAX_ASPECT_RATIO = 20.0


class BadInput(Exception):
    """Internal: an input that cannot be turned into an image (message = the reason)."""


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip().lower() not in ("0", "false", "no", "off", "n")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        from xqtool.errors import ConfigError

        raise ConfigError(f"{name} must be a number >= 1 or 0 (no limit), got {raw!r}") from None
    if not np.isfinite(value) or (value != 0 and value < 1):
        from xqtool.errors import ConfigError

        raise ConfigError(f"{name} must be a number >= 1 or 0 (no limit), got {raw!r}")
    return value


@dataclass(frozen=True)
class ReadOptions:
    """How image files are read.

    Attributes:
        exif_transpose: apply the EXIF orientation tag (default True; env ``XQTOOL_EXIF_TRANSPOSE``).
        max_aspect_ratio: refuse images whose long/short side ratio exceeds this (default 20; 0 = no
            limit; env ``XQTOOL_MAX_ASPECT_RATIO``).
    """

    exif_transpose: bool = True
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def from_env(cls) -> "ReadOptions":
        """Defaults, overridden by ``XQTOOL_EXIF_TRANSPOSE`` / ``XQTOOL_MAX_ASPECT_RATIO``."""
        return cls(
            exif_transpose=_env_flag("XQTOOL_EXIF_TRANSPOSE", True),
            max_aspect_ratio=_env_float("XQTOOL_MAX_ASPECT_RATIO", DEFAULT_MAX_ASPECT_RATIO),
        )

    def describe(self) -> str:
        """Text for manifests and reports."""
        exif = "EXIF orientation applied" if self.exif_transpose else "EXIF orientation ignored"
        limit = f"aspect ratio <= {self.max_aspect_ratio:g}" if self.max_aspect_ratio else "no aspect-ratio limit"
        return f"{exif}; {limit}"


_SWAP = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}


def _sixteen_bit_colour(img: Image.Image) -> bool:
    """True for a not-yet-loaded colour image whose samples are 16-bit (Pillow keeps only the high byte)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or not img.tile:
        return False
    args = img.tile[0].args
    raw = args if isinstance(args, str) else (args[0] if args else "")
    return isinstance(raw, str) and raw.endswith((";16B", ";16L", ";16N"))


def _redecode(data: bytes, rawmode: Callable[[str], str], name: str) -> Image.Image:
    """Decode `data` again with every tile's raw mode replaced by ``rawmode(old)`` -> loaded image."""
    img = Image.open(io.BytesIO(data))
    tiles = []
    for t in img.tile:
        args = t.args
        raw = args if isinstance(args, str) else args[0]
        new = rawmode(raw)
        tiles.append(t._replace(args=new if isinstance(args, str) else (new,) + tuple(args[1:])))
    img.tile = tiles
    try:
        img.load()
    except Exception:  # noqa: BLE001 - a decoder without that raw mode: refuse by name
        raise BadInput(f"16-bit {name} image ({img.format}) cannot be read exactly: convert it to 8 or 16-bit PNG") from None
    return img


def _round257(value: np.ndarray) -> np.ndarray:
    """uint 0..65535 -> uint8 round(v / 257) (never a tie: 257 is odd)."""
    return ((value.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)


def _exact_sixteen_bit(high: Image.Image, data: bytes, exif: bool) -> Image.Image:
    """8-bit image with round((256 * hi + lo) / 257) per sample (both decodes EXIF-transposed when `exif`).

    RGB/RGBA: a second decode with the other byte order yields the low bytes. 16-bit gray+alpha (raw
    ``LA;16B``, which Pillow reads as RGBA): one decode as 8-bit RGBA gives the bytes (Lhi, Llo, Ahi, Alo).
    """
    raw = high.tile[0].args if high.tile else None
    raw = raw if isinstance(raw, str) or raw is None else raw[0]
    if raw is not None and raw.startswith("LA;16"):
        both = _redecode(data, lambda r: "RGBA", "gray+alpha")
        if exif:
            _transpose(both)
        b = np.asarray(both, dtype=np.uint32)
        la = np.stack([_round257(b[..., 0] * 256 + b[..., 1]), _round257(b[..., 2] * 256 + b[..., 3])], -1)
        out = Image.fromarray(la, mode="LA")
        out.info = dict(both.info)
        return out
    low = _redecode(data, lambda r: r[:-1] + _SWAP[r[-1]], high.mode)
    high.load()
    if exif:
        _transpose(high)
        _transpose(low)
    value = np.asarray(high, dtype=np.uint32) * 256 + np.asarray(low, dtype=np.uint32)
    out = Image.fromarray(_round257(value), mode=high.mode)
    out.info = dict(high.info)
    return out


def decode_image(data: Optional[bytes], options: Optional[ReadOptions] = None) -> Image.Image:
    """Decode image bytes fully -> PIL image as displayed (any mode; colour 16-bit already scaled to 8).

    Raises BadInput with a short reason: empty, unreadable or truncated data, decompression bombs (over
    ``Image.MAX_IMAGE_PIXELS``), aspect ratio over ``options.max_aspect_ratio``, 32-bit ``I``/``F`` images.
    """
    opts = options if options is not None else ReadOptions.from_env()
    if data is None or len(data) == 0:
        raise BadInput("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            raise BadInput(f"decompression bomb: {w}x{h} = {w * h} pixels > PIL limit {limit}")
        if w < 1 or h < 1:
            raise BadInput("image has zero width or height")
        ratio = max(w, h) / min(w, h)
        if opts.max_aspect_ratio and ratio > opts.max_aspect_ratio:
            raise BadInput(
                f"aspect ratio {ratio:.4g}:1 ({w}x{h}) exceeds the limit {opts.max_aspect_ratio:g}:1 "
                "(XQTOOL_MAX_ASPECT_RATIO; 0 = no limit)"
            )
        sixteen = _sixteen_bit_colour(img)
        if not sixteen:
            img.load()
        else:
            img = _exact_sixteen_bit(img, data, opts.exif_transpose)
    except BadInput:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInput(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadInput("not a readable image (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        msg = str(exc).split("\n")[0][:200]
        raise BadInput(f"truncated or corrupt image ({type(exc).__name__}: {msg})") from None
    if img.mode == "F":
        raise BadInput("32-bit float image (mode F) has no defined 8-bit scale: convert it to 8 or 16-bit")
    if img.mode == "I" and img.format != "PNG":
        raise BadInput("32-bit integer image (mode I) has no defined 8-bit scale: convert it to 8 or 16-bit")
    if opts.exif_transpose and not sixteen:
        _transpose(img)
    return img


def _transpose(img: Image.Image) -> None:
    """Apply the EXIF orientation in place (``ImageOps.exif_transpose``)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block is a bad input, not a crash
        raise BadInput(f"unreadable EXIF orientation ({type(exc).__name__}: {str(exc)[:100]})") from None
