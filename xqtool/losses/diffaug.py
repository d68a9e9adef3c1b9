"""Differentiable augmentation (DiffAug) applied to real and fake images before the DINO
discriminator (spec §5.4).

Images ``[B, C, H, W]`` (any range; xqtool uses [-1, 1]). Per call, each of translation, colour
and cutout is enabled with probability `prob` (one draw each for the whole batch); an optional
separable Gaussian blur runs first while the fade schedule is positive. All operations are
differentiable with respect to the input image.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable blur with kernel 2^(−(k/σ)²) (normalised), radius ⌊3σ⌋, reflect padding."""
    if sigma <= 0:
        return x
    radius = int(math.floor(3 * sigma))
    if radius < 1:
        return x
    h, w = x.shape[-2:]
    radius = min(radius, h - 1, w - 1)
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp2(-((k / sigma) ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    xp = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(xp, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    xp = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(xp, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def rand_translation(x: Tensor, ratio: float = 0.125, generator: Optional[torch.Generator] = None) -> Tensor:
    """Shift each sample by an integer in [−round(ratio·H), +round(ratio·H)] per axis, zero fill."""
    b, c, h, w = x.shape
    sh, sw = int(round(h * ratio)), int(round(w * ratio))
    if sh == 0 and sw == 0:
        return x
    ty = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device, generator=generator)
    tx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device, generator=generator)
    gy, gx = torch.meshgrid(
        torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij"
    )
    src_y = gy.unsqueeze(0) - ty  # [B, H, W]
    src_x = gx.unsqueeze(0) - tx
    valid = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    idx = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = torch.gather(x.reshape(b, c, h * w), 2, idx).view(b, c, h, w)
    return out * valid.unsqueeze(1).to(x.dtype)


def rand_color(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Brightness + U(−0.5, 0.5); saturation ×U(0, 2) around the channel mean; contrast ×U(0.5, 1.5)."""
    b = x.shape[0]
    dev, dt = x.device, x.dtype
    x = x + (torch.rand(b, 1, 1, 1, device=dev, generator=generator).to(dt) - 0.5)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (torch.rand(b, 1, 1, 1, device=dev, generator=generator).to(dt) * 2) + mean_c
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_all) * (torch.rand(b, 1, 1, 1, device=dev, generator=generator).to(dt) + 0.5) + mean_all
    return x


def rand_cutout(x: Tensor, ratio: float = 0.2, generator: Optional[torch.Generator] = None) -> Tensor:
    """Zero a round(ratio·H) × round(ratio·W) square at a random centre per sample."""
    b, _, h, w = x.shape
    ch, cw = int(round(h * ratio)), int(round(w * ratio))
    if ch == 0 or cw == 0:
        return x
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device, generator=generator)
    gy, gx = torch.meshgrid(
        torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij"
    )
    y0 = cy - ch // 2
    x0 = cx - cw // 2
    inside = (gy >= y0) & (gy < y0 + ch) & (gx >= x0) & (gx < x0 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def fade_blur_schedule(step: int, disc_start: int, fade_steps: int) -> float:
    """Blur strength in [0, 1]: with ``fade_steps == 0`` 1 up to `disc_start` and 0 after;
    otherwise a linear fade from 1 to 0 over `fade_steps` steps starting at `disc_start`."""
    if fade_steps <= 0:
        return 1.0 if step <= disc_start else 0.0
    return float(min(max(1.0 - (step - disc_start) / fade_steps, 0.0), 1.0))


class DiffAug:
    """DiffAug with translation, colour and cutout (StyleGAN-T / VAR discriminator style).

    Args:
        prob: probability that each augmentation is applied in a call.
        cutout: cutout size ratio (0.2).
        translation: translation ratio (0.125).
    Call: ``aug(x, blur=0.0)``: `blur` is the fade schedule value; σ = sqrt(H/2)·blur.
    """

    def __init__(self, prob: float = 1.0, cutout: float = 0.2, translation: float = 0.125) -> None:
        self.prob = float(prob)
        self.cutout = float(cutout)
        self.translation = float(translation)

    def __call__(self, x: Tensor, blur: float = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
        if blur > 0:
            x = gaussian_blur(x, math.sqrt(x.shape[-2] / 2) * blur)
        if self.prob <= 0:
            return x
        draws = torch.rand(3, generator=generator)
        if draws[0] < self.prob:
            x = rand_translation(x, self.translation, generator if x.device.type == "cpu" else None)
        if draws[1] < self.prob:
            x = rand_color(x, generator if x.device.type == "cpu" else None)
        if draws[2] < self.prob:
            x = rand_cutout(x, self.cutout, generator if x.device.type == "cpu" else None)
        return x


__all__ = ["DiffAug", "fade_blur_schedule", "gaussian_blur", "rand_color", "rand_cutout", "rand_translation"]
