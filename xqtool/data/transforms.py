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

#: One-line description of the evaluation/encoding preprocessing, written into manifests and reports.
EVAL_PREPROCESSING = (
    "RGB (alpha over white, 16-bit scaled to 8-bit); ADM center crop: BOX halving while the shorter side >= 2S, "
    "bicubic resize of the shorter side to S, center crop SxS; x/127.5-1 in [-1,1]"
)
#: One-line description of the training preprocessing.
TRAIN_PREPROCESSING = (
    "RGB; ADM random-resize-crop: shorter side uniform in [ceil(S/1.0), ceil(S/0.8)], BOX halving, bicubic resize, "
    "random SxS crop; random horizontal flip; x/127.5-1 in [-1,1]"
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit 'L'."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        hi = float(arr.max()) if arr.size else 1.0
        arr = arr * (255.0 if hi <= 1.0 else 1.0)
    elif arr.size and arr.max() > 255:
        arr = arr / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Grayscale ('1', 'L') is replicated; palette images are expanded (through RGBA when they carry
    transparency); images with alpha ('RGBA', 'LA', 'PA', 'La', 'RGBa') are composited over white;
    CMYK / YCbCr / LAB / HSV are converted; 16-bit and 32-bit single-channel images ('I;16', 'I', 'F')
    are scaled to 8 bits first.
    """
    if img.mode == "RGB":
        return img
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


def _resize_shorter(img: Image.Image, shorter: int) -> Image.Image:
    scale = shorter / min(img.size)
    size = tuple(max(shorter, round(x * scale)) for x in img.size)
    return img.resize(size, resample=Image.BICUBIC)


def center_crop_arr(img: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop of an RGB image -> uint8 array [S, S, 3]."""
    img = _resize_shorter(_box_halve(img, image_size), image_size)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


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
    img = _resize_shorter(_box_halve(img, shorter), shorter)
    arr = np.asarray(img)
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """FloatTensor [B, 3, H, W] in [-1, 1] -> uint8 array [B, H, W, 3] (round((x + 1) * 127.5))."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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
