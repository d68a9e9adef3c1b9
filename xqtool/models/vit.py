"""DINOv2-style ViT encoder / decoder with learned latent tokens (tokenizer spec §2.3, §2.5, §2.7).

Both wrap a timm ``VisionTransformer`` (``.model``) built with random init; parameter names are timm's, so the
``encoder.model.*`` / ``decoder.model.*`` keys equal the official checkpoint keys (spec §4.2). Pretrained weights are
never fetched here: see :mod:`xqtool.checkpoints.pretrained`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import timm
import torch
from torch import nn

from xqtool.errors import ConfigError
from xqtool.models.pos_embed import resample_pos_grid

DEFAULT_VIT = "vit_base_patch14_dinov2.lvd142m"


def build_vit_backbone(
    model_name: str = DEFAULT_VIT,
    image_size: int = 256,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    num_classes: int = 0,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialised timm ViT (``pretrained=False``, never touches the network).

    ``overrides`` (e.g. ``embed_dim=64, depth=2, num_heads=2`` for tiny test models) are passed to timm; ``None``
    values mean "backbone default" and are dropped.
    """
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size != 0:
        raise ConfigError(
            f"model.image_size {image_size} must be a positive multiple of model.vit_patch_size {patch_size}"
        )
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        return timm.create_model(
            model_name,
            pretrained=False,
            img_size=image_size,
            patch_size=patch_size,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        if "Unknown model" in str(exc):
            raise ConfigError(f"unknown timm model {model_name!r}: use e.g. {DEFAULT_VIT!r}") from None
        raise


def _latent_side(num_latent_tokens: int, abs_pos_embed: bool) -> int:
    side = math.isqrt(num_latent_tokens)
    if num_latent_tokens <= 0 or (abs_pos_embed and side * side != num_latent_tokens):
        raise ConfigError(
            f"model.num_latent_tokens {num_latent_tokens} must be a perfect square (e.g. 121 or 256)"
        )
    return side


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The active autocast dtype for ``device_type`` or None when autocast is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device types without autocast support
        return None
    return None


def _pos_grid(model: nn.Module) -> torch.Tensor:
    """The pos-embed slots of the image grid ``[1, g·g, E]`` (prefix/cls slots removed)."""
    start = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return model.pos_embed[:, start:]


def _level_ids(num_prefix_positions: int, counts: list[int]) -> torch.Tensor:
    """``[1, num_prefix_positions + sum(counts)]`` int64: zeros, then ``counts[i]`` copies of ``i + 1``."""
    parts = [torch.zeros(num_prefix_positions, dtype=torch.long)]
    parts += [torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(counts)]
    return torch.cat(parts).unsqueeze(0)


class _LatentViT(nn.Module):
    """What the ViT encoder and decoder share: the timm backbone ``model``, the grid / latent shape facts, the level
    embedding (``lvl_embed``, ``lvl1LC``), the optional learned latent positions and the transformer run.

    Raises ConfigError when ``image_size`` is not a multiple of ``patch_size``, ``num_latent_tokens`` is not a perfect
    square (with ``abs_pos_embed``) or the timm model is unknown.
    """

    def __init__(self, model_name: str, image_size: int, patch_size: int, num_latent_tokens: int, abs_pos_embed: bool,
                 drop_path_rate: float, backbone_overrides: dict[str, Any]) -> None:
        super().__init__()
        self.model = build_vit_backbone(model_name, image_size, patch_size, drop_path_rate, **backbone_overrides)
        self.image_size = image_size
        self.patch_size = patch_size
        self._grid = image_size // patch_size
        self._num_latent = num_latent_tokens
        self._latent_side = _latent_side(num_latent_tokens, abs_pos_embed)
        self.abs_pos_embed = abs_pos_embed

    def _init_levels(self, counts: list[int], num_positions: int) -> None:
        """Create ``lvl_embed`` (``1 + len(counts)`` rows: level 0 = image prefix, level i + 1 = ``counts[i]``
        tokens), ``latent_pos_embed [1, num_positions, E]`` (None with ``abs_pos_embed``) and ``lvl1LC``."""
        e = self.model.embed_dim
        self.lvl_embed = nn.Embedding(1 + len(counts), e)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=math.sqrt(1.0 / e / 3.0))
        if self.abs_pos_embed:
            self.latent_pos_embed = None
        else:
            self.latent_pos_embed = nn.Parameter(torch.empty(1, num_positions, e))
            nn.init.trunc_normal_(self.latent_pos_embed, std=0.02)
        n_prefix = self.model.patch_embed.num_patches + self.model.num_prefix_tokens
        self.register_buffer("lvl1LC", _level_ids(n_prefix, counts), persistent=False)

    def _with_latent_pos(self, lat: torch.Tensor, groups: int) -> torch.Tensor:
        """``lat [b, groups·N, E]`` (fp32) plus the latent positions: the learned ``latent_pos_embed``, or the
        backbone's image-grid positions resampled to √N×√N (spec §2.3, §2.5) added to each of the ``groups`` blocks."""
        if self.latent_pos_embed is not None:
            return lat + self.latent_pos_embed.float()
        side = self._latent_side
        pos = resample_pos_grid(_pos_grid(self.model).float(), side, side)  # [1, N, E]
        b = lat.shape[0]
        lat = lat.view(b, groups, self._num_latent, -1) + pos.unsqueeze(1)
        return lat.reshape(b, groups * self._num_latent, -1)

    def _run_transformer(self, h: torch.Tensor, cast: Optional[torch.dtype]) -> torch.Tensor:
        """norm_pre → blocks (gradient-checkpointed when enabled on the timm model) → final norm; ``[B, T, E]``.

        Training under autocast (``cast``) runs the residual stream in the autocast dtype (as the reference does,
        saving memory); inference keeps it fp32 (matmuls still in bf16/fp16), which keeps tokens closer to fp32
        at almost no cost.
        """
        if cast is not None and self.training:
            h = h.to(cast)
        model = self.model
        h = model.norm_pre(h)
        if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq

            h = checkpoint_seq(model.blocks, h)
        else:
            h = model.blocks(h)
        return model.norm(h)

    @property
    def embed_dim(self) -> int:
        """Token width E (768 for ViT-B)."""
        return int(self.model.embed_dim)

    @property
    def num_latent_tokens(self) -> int:
        """Latent tokens per branch N."""
        return self._num_latent

    @property
    def grid(self) -> int:
        """Image-token grid side g = image_size / patch_size."""
        return self._grid

    @property
    def latent_side(self) -> int:
        """Latent grid side √N."""
        return self._latent_side


class ViTEncoder(_LatentViT):
    """DINOv2 ViT encoder emitting ``P·N`` learned latent tokens.

    ``forward(x [B, 3, S, S] in [-1, 1]) -> [B, P·N, E]`` (branch ``i`` = tokens ``i·N … (i+1)·N − 1``, each a
    row-major √N×√N grid). Raises ConfigError when ``num_branches < 1`` (and see :class:`_LatentViT`).
    """

    def __init__(self, model_name: str = DEFAULT_VIT, image_size: int = 256, patch_size: int = 16,
                 num_latent_tokens: int = 256, num_branches: int = 1, abs_pos_embed: bool = True,
                 drop_path_rate: float = 0.0, **backbone_overrides: Any) -> None:
        if num_branches < 1:
            raise ConfigError(f"quant.product_quant must be >= 1, got {num_branches}")
        super().__init__(model_name, image_size, patch_size, num_latent_tokens, abs_pos_embed, drop_path_rate,
                         backbone_overrides)
        self.num_branches = num_branches
        total = num_branches * num_latent_tokens
        self.latent_tokens = nn.Parameter(torch.empty(1, total, self.model.embed_dim))
        nn.init.normal_(self.latent_tokens, std=1e-6)
        self._init_levels([num_latent_tokens] * num_branches, total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        b = x.shape[0]
        h = m.patch_embed(x)  # [B, g·g, E] (autocast dtype under mixed precision)
        cast = _autocast_dtype(h.device.type)
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = m._pos_embed(h.float())  # [B, prefix + g·g, E]: cls + pos slot 0, tokens + slots 1…
            h = m.patch_drop(h)
            lat = self._with_latent_pos(self.latent_tokens.float(), self.num_branches).expand(b, -1, -1)
            h = torch.cat([h, lat], dim=1)
            h = h + self.lvl_embed(self.lvl1LC).float()
        h = self._run_transformer(h, cast)
        return h[:, -self.num_branches * self._num_latent :]


class _PatchGridStub(nn.Module):
    """Parameter-free stand-in for the decoder backbone's deleted patch embedding (keeps the grid numbers)."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.num_patches = grid_size[0] * grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - guard
        raise RuntimeError("the ViT decoder has no patch embedding")


class ToPixel(nn.Module):
    """Per-token linear head ``model``: ``[B, g·g, E] -> [B, g·g, 3·p·p]`` (keys ``model.weight/bias``)."""

    def __init__(self, embed_dim: int, patch_size: int, out_channels: int = 3) -> None:
        super().__init__()
        self.model = nn.Linear(embed_dim, out_channels * patch_size * patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """``[B, g·g, p·p·C] -> [B, C, g·p, g·p]``.

    Pixel (c, p·i + u, p·j + v) = feature (u·p + v)·C + c of token i·g + j (spec §2.5).
    """
    b, n, f = tokens.shape
    g = math.isqrt(n)
    p = patch_size
    if g * g != n or f != p * p * channels:
        raise ValueError(f"cannot unpatchify tokens of shape {tuple(tokens.shape)} with patch {p}")
    x = tokens.reshape(b, g, g, p, p, channels)  # [B, i, j, u, v, c]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * p, g * p)


class ViTDecoder(_LatentViT):
    """DINOv2 ViT decoder: ``forward(z [B, N, E]) -> [B, 3, S, S]`` (unbounded).

    Sequence = [cls, g·g mask tokens, cls, N latents] (+ pos-embed, + lvl_embed), blocks, final norm, image positions
    → ``to_pixel`` → unpatchify. The backbone's patch embedding is replaced by a parameter-free stub (not in the
    state_dict, matching the official layout). Raises ConfigError as :class:`_LatentViT`.
    """

    def __init__(self, model_name: str = DEFAULT_VIT, image_size: int = 256, patch_size: int = 16,
                 num_latent_tokens: int = 256, abs_pos_embed: bool = True, drop_path_rate: float = 0.0,
                 **backbone_overrides: Any) -> None:
        super().__init__(model_name, image_size, patch_size, num_latent_tokens, abs_pos_embed, drop_path_rate,
                         backbone_overrides)
        pe = self.model.patch_embed
        self.model.patch_embed = _PatchGridStub(tuple(pe.img_size), tuple(pe.patch_size), tuple(pe.grid_size))
        self.mask_token = nn.Parameter(torch.empty(1, 1, self.model.embed_dim))
        nn.init.normal_(self.mask_token, std=1e-6)
        self._init_levels([self.model.num_prefix_tokens + num_latent_tokens], num_latent_tokens)
        self.to_pixel = ToPixel(self.model.embed_dim, patch_size)

    @property
    def last_layer(self) -> nn.Parameter:
        """``to_pixel.model.weight`` [3·p·p, E] (for the adaptive GAN weight)."""
        return self.to_pixel.model.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = self.model
        b, n, e = z.shape
        if n != self._num_latent or e != self.embed_dim:
            raise ValueError(
                f"decoder expects [B, {self._num_latent}, {self.embed_dim}] latents, got {tuple(z.shape)}"
            )
        num_patches = m.patch_embed.num_patches
        cast = _autocast_dtype(z.device.type)
        with torch.autocast(device_type=z.device.type, enabled=False):
            masks = self.mask_token.float().expand(b, num_patches, -1)
            h = m._pos_embed(masks)  # [B, prefix + g·g, E]
            prefix = h[:, : m.num_prefix_tokens]  # cls (+ its pos slot), identical for the second copy
            h = torch.cat([h, prefix, self._with_latent_pos(z.float(), 1)], dim=1)
            h = h + self.lvl_embed(self.lvl1LC).float()
        h = self._run_transformer(h, cast)
        start = m.num_prefix_tokens
        pix = self.to_pixel(h[:, start : start + num_patches])  # [B, g·g, 3·p·p]
        return unpatchify(pix, self.patch_size)
