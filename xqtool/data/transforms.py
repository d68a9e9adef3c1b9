"""Image preprocessing (spec 5.7): RGB conversion, ADM center crop / random-resize-crop, [-1, 1] tensors.

Every image that enters a model goes through :func:`to_rgb` and then one of

* :func:`center_crop_arr` (evaluation, encoding): halve with a BOX filter while the shorter side is
  at least twice the target, bicubic-resize the shorter side to ``image_size``, center-crop a square;
* :func:`random_crop_arr` (training): pick the shorter side uniformly in
  ``[ceil(S / max_frac), ceil(S / min_frac)]`` (``[S, 1.25 S]`` by default), BOX halving, bicubic
  resize, random square crop; followed by a random horizontal flip;

and finally :func:`to_tensor` (uint8 HWC -> float CHW in [-1, 1]).
"""

from __future__ import annotations

import math
import random
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image

from xqtool.data.reading import BadInput, ReadOptions

#: One-line description of the evaluation/encoding preprocessing (default read options), for manifests.
_EVAL_STEPS = (
    "RGB (alpha over white, 16-bit round(v/257)); ADM center crop: BOX halving while the shorter side >= 2S, "
    "bicubic resize of the shorter side to S, center crop SxS; x/127.5-1 in [-1,1]"
)


def eval_preprocessing(options: Optional[ReadOptions] = None) -> str:
    """One-line description of the evaluation/encoding preprocessing with the read options in force
    (default :meth:`ReadOptions.from_env`), for manifests and reports."""
    opts = options if options is not None else ReadOptions.from_env()
    return f"{opts.describe()}; {_EVAL_STEPS}"


EVAL_PREPROCESSING = eval_preprocessing(ReadOptions())
#: One-line description of the training preprocessing.
TRAIN_PREPROCESSING = (
    "RGB; ADM random-resize-crop: shorter side uniform in [ceil(S/1.0), ceil(S/0.8)], BOX halving, bicubic resize, "
    "random SxS crop; random horizontal flip; x/127.5-1 in [-1,1]"
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16-bit grayscale image to 8-bit 'L' by its mode: round(v / 257), whatever the content.

    Mode ``I`` is accepted as the 16-bit PNG reading of older Pillow versions (values 0..65535);
    :func:`xqtool.data.reading.decode_image` refuses ``I`` images from other formats.
    """
    arr = np.asarray(img, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise BadInput(f"mode {img.mode} image with values outside 0..65535 has no defined 8-bit scale")
    return Image.fromarray(((arr * 2 + 257) // 514).astype(np.uint8), mode="L")  # round(v / 257)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Grayscale ('1', 'L') is replicated; palette images are expanded (through RGBA when they carry
    transparency); images with alpha ('RGBA', 'LA', 'PA', 'La', 'RGBa') are composited over white;
    CMYK / YCbCr / LAB / HSV are converted; 16-bit grayscale ('I;16*', 'I' from PNG) is scaled by
    round(v / 257). Float images ('F') raise :class:`~xqtool.data.reading.BadInput`.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        raise BadInput("32-bit float image (mode F) has no defined 8-bit scale: convert it to 8 or 16-bit")
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _box_halve(img: Image.Image, target: int) -> Image.Image:
    while min(img.size) >= 2 * target:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img


def _resized_size(img: Image.Image, shorter: int) -> tuple:
    """(W, H) of the image after resizing its shorter side to `shorter` (ADM rounding)."""
    scale = shorter / min(img.size)
    return tuple(max(shorter, round(x * scale)) for x in img.size)


#: Resized images larger than this many crop windows (aspect ratio > 4) are resized window-only.
_WINDOW_AREA_FACTOR = 4


def _resize_crop(img: Image.Image, shorter: int, top: int, left: int, side: int) -> np.ndarray:
    """The ``side x side`` window at (top, left) of the image resized (bicubic) to shorter side `shorter`.

    For aspect ratios up to 4 it resizes the whole image and crops (the ADM path). Beyond, the result is
    the same up to rounding (max 2 levels in rare pixels; Pillow's horizontal-then-vertical passes, up to
    float rounding of the window's source coordinates), but only the window is computed: the source
    rows the vertical pass reads are cut out first, then each pass resizes only its window
    (``Image.resize(box=...)``), so a 1x32000 strip never becomes a 256x8192000 image.
    """
    w, h = img.size
    W, H = _resized_size(img, shorter)
    if W * H <= _WINDOW_AREA_FACTOR * side * side:  # ordinary aspect ratios: the plain ADM path, bit for bit
        return np.asarray(img.resize((W, H), resample=Image.BICUBIC))[top : top + side, left : left + side]
    sx, sy = w / W, h / H
    support = 2.0 * max(sy, 1.0) + 2.0  # bicubic support (2) in source rows, plus rounding slack
    r0 = max(0, int(math.floor(top * sy - support)))
    r1 = min(h, int(math.ceil((top + side) * sy + support)))
    rows = img.crop((0, r0, w, r1))
    rows = rows.resize((side, r1 - r0), resample=Image.BICUBIC, box=(left * sx, 0, (left + side) * sx, r1 - r0))
    out = rows.resize((side, side), resample=Image.BICUBIC, box=(0, top * sy - r0, side, (top + side) * sy - r0))
    return np.asarray(out)


def center_crop_arr(img: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop of an RGB image -> uint8 array [S, S, 3]."""
    img = _box_halve(img, image_size)
    W, H = _resized_size(img, image_size)
    return np.ascontiguousarray(_resize_crop(img, image_size, (H - image_size) // 2, (W - image_size) // 2, image_size))


def random_crop_arr(
    img: Image.Image,
    image_size: int,
    rng: random.Random,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """ADM random-resize-crop of an RGB image -> uint8 array [S, S, 3]."""
    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    shorter = rng.randrange(lo, hi + 1)
    img = _box_halve(img, shorter)
    W, H = _resized_size(img, shorter)
    top = rng.randrange(H - image_size + 1)
    left = rng.randrange(W - image_size + 1)
    return np.ascontiguousarray(_resize_crop(img, shorter, top, left, image_size))


def ten_crop_arrs(img: Image.Image, image_size: int, scale: float = 1.1) -> List[np.ndarray]:
    """Ten views for generator-training augmentation -> 10 uint8 arrays [S, S, 3].

    ADM center crop to ``round(scale * S)``, then the four corner and the center SxS crops, then the
    same five of the horizontally flipped image.
    """
    big = center_crop_arr(img, int(round(scale * image_size)))
    n = big.shape[0]
    s = image_size
    offsets = [(0, 0), (0, n - s), (n - s, 0), (n - s, n - s), ((n - s) // 2, (n - s) // 2)]
    crops = [big[t : t + s, l : l + s] for t, l in offsets]
    flipped = big[:, ::-1]
    crops += [flipped[t : t + s, l : l + s] for t, l in offsets]
    return [np.ascontiguousarray(c) for c in crops]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 array [H, W, 3] -> FloatTensor [3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation preprocessing: PIL image (any mode) -> FloatTensor [3, S, S] in [-1, 1]."""

    def apply(img: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop_arr(to_rgb(img), image_size))

    return apply


def train_transform(image_size: int) -> Callable[[Image.Image, random.Random], torch.Tensor]:
    """Training preprocessing: (PIL image, rng) -> FloatTensor [3, S, S] in [-1, 1] (random crop + flip)."""

    def apply(img: Image.Image, rng: random.Random) -> torch.Tensor:
        arr = random_crop_arr(to_rgb(img), image_size, rng)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(arr)

    return apply


def var_train_transform(image_size: int, hflip: bool = False,
                        mid_reso: float = 1.125) -> Callable[[Image.Image, random.Random], torch.Tensor]:
    """VAR training preprocessing (var.md §1.5): (PIL image, rng) -> FloatTensor [3, S, S] in [-1, 1].

    Resize the shorter side to round(mid_reso·S) (288 for 256) with LANCZOS (torchvision's ``Resize``), a random
    S×S crop (torchvision ``RandomCrop`` positions, drawn from `rng`), a horizontal flip with probability ½ only
    when `hflip` (off by default, as upstream), then x/127.5 − 1.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    mid = round(mid_reso * image_size)

    def apply(img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = TF.resize(to_rgb(img), mid, interpolation=InterpolationMode.LANCZOS)
        arr = np.asarray(img)
        top = rng.randint(0, arr.shape[0] - image_size)
        left = rng.randint(0, arr.shape[1] - image_size)
        arr = arr[top : top + image_size, left : left + image_size]
        if hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return to_tensor(np.ascontiguousarray(arr))

    return apply


def view_transform(image_size: int, augmentation: Optional[str]) -> Callable[[Image.Image], List[torch.Tensor]]:
    """Deterministic views for encoding: 'none' -> [center], 'flip' -> [center, flipped center],
    'ten-crop' -> the ten crops of :func:`ten_crop_arrs`. Each view is FloatTensor [3, S, S]."""
    aug = augmentation or "none"

    def apply(img: Image.Image) -> List[torch.Tensor]:
        rgb = to_rgb(img)
        if aug == "none":
            return [to_tensor(center_crop_arr(rgb, image_size))]
        if aug == "flip":
            arr = center_crop_arr(rgb, image_size)
            return [to_tensor(arr), to_tensor(arr[:, ::-1])]
        if aug == "ten-crop":
            return [to_tensor(a) for a in ten_crop_arrs(rgb, image_size)]
        raise ValueError(f"unknown augmentation {aug!r}")

    return apply


def view_names(augmentation: Optional[str]) -> List[str]:
    """Key suffixes of the views of :func:`view_transform` ('' for the plain center crop)."""
    aug = augmentation or "none"
    if aug == "none":
        return [""]
    if aug == "flip":
        return ["", "@flip"]
    if aug == "ten-crop":
        return [f"@crop{i}" for i in range(10)]
    raise ValueError(f"unknown augmentation {aug!r}")
