"""GAN discriminators for tokenizer training (spec §5.4).

All take images ``[B, 3, H, W]`` in [-1, 1] and return logits:

* :class:`PatchGANDiscriminator` (pix2pix NLayer): ``[B, 1, h, w]`` patch logits.
* :class:`StyleGANDiscriminator` (StyleGAN2-style residual blocks with blur): ``[B, 1]``.
* :class:`DinoDiscriminator` (StyleGAN-T / VAR style): a frozen DINO ViT-S/16 (kept outside the
  state_dict) read at the embedding and 4 block outputs, 5 trainable 1-D conv heads with spectral
  norm → ``[B, 5·N]`` logits (N = number of patches, 196 at 224 px).

:func:`build_discriminator` picks one from ``loss.disc_type``. Keyword overrides shrink them for
tests (``ndf``/``n_layers`` for PatchGAN, ``base_channels``/``max_channels`` for StyleGAN,
``img_size``/``embed_dim``/``depth``/``num_heads``/``patch_size`` for the DINO backbone).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from xqtool.errors import ConfigError

log = logging.getLogger(__name__)

DISC_TYPES = ("patchgan", "stylegan", "dinodisc", "none")
DINO_DISC_ENV = "XQTOOL_DINO_DISC_WEIGHTS"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- PatchGAN
class PatchGANDiscriminator(nn.Module):
    """pix2pix NLayer discriminator (ndf 64, n_layers 3): ``[B,3,H,W]`` → ``[B,1,h,w]``."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


# ----------------------------------------------------------------------------- StyleGAN
class _Blur(nn.Module):
    """[1,2,1]⊗[1,2,1] normalised depthwise blur, reflect padding."""

    kernel: Tensor

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = k[:, None] * k[None, :]
        self.register_buffer("kernel", (k2 / k2.sum())[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.kernel.to(x.dtype).expand(c, 1, 3, 3), groups=c)


class _StyleBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.res = nn.Conv2d(cin, cout, 1, stride=2)
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.LeakyReLU(0.2, True),
        )
        self.blur = _Blur()
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        res = self.res(x)
        x = self.down(self.blur(self.net(x)))
        return (x + res) / math.sqrt(2)


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2-style discriminator: ``[B,3,S,S]`` → ``[B,1]`` (S a power of two ≥ 8).

    Width at resolution r: min(max_channels, base_channels·256/r) (64, 128, 256, 512 at 256, 128,
    64, ≤32 px by default). Blocks halve the resolution down to 4×4, then conv3×3 → flatten →
    Linear → LeakyReLU → Linear 1.
    """

    def __init__(self, image_size: int = 256, base_channels: int = 64, max_channels: int = 512) -> None:
        super().__init__()
        log_size = int(math.log2(image_size))
        if 2**log_size != image_size or image_size < 8:
            raise ConfigError(f"disc_type 'stylegan' needs a power-of-two image_size >= 8, got {image_size}")

        def ch(res: int) -> int:
            return int(min(max_channels, base_channels * max(1, 256 // res)))

        self.stem = nn.Sequential(nn.Conv2d(3, ch(image_size), 3, padding=1), nn.LeakyReLU(0.2, True))
        blocks = []
        res = image_size
        while res > 4:
            blocks.append(_StyleBlock(ch(res), ch(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = ch(4)
        self.final_conv = nn.Sequential(nn.Conv2d(c4, c4, 3, padding=1), nn.LeakyReLU(0.2, True))
        self.final = nn.Sequential(nn.Linear(c4 * 16, c4), nn.LeakyReLU(0.2, True), nn.Linear(c4, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.final_conv(self.blocks(self.stem(x)))
        return self.final(x.flatten(1))


# ----------------------------------------------------------------------------- DINO disc
class BatchNormLocal(nn.Module):
    """Batch norm over groups of `virtual_bs` samples (per group, per channel; biased var), ``[B,C,L]``."""

    def __init__(self, num_features: int, virtual_bs: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for chunk in torch.split(x, self.virtual_bs, dim=0):
            mean = chunk.mean(dim=(0, 2), keepdim=True)
            var = chunk.var(dim=(0, 2), keepdim=True, unbiased=False)
            outs.append((chunk - mean) / torch.sqrt(var + self.eps))
        x = torch.cat(outs, dim=0)
        return x * self.weight[None, :, None] + self.bias[None, :, None]


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


def _head(c: int) -> nn.Sequential:
    def block(k: int) -> nn.Sequential:
        conv = nn.Conv1d(c, c, k, padding=k // 2, padding_mode="circular")
        return nn.Sequential(spectral_norm(conv, eps=1e-12), BatchNormLocal(c), nn.LeakyReLU(0.2, True))

    return nn.Sequential(block(1), _Residual(block(9)), spectral_norm(nn.Conv1d(c, 1, 1), eps=1e-12))


def build_dino_backbone(
    img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12, num_heads: int = 6
) -> nn.Module:
    """Random-init timm ViT with DINO ViT-S/16 hyper-parameters (GELU tanh, LayerNorm eps 1e-6)."""
    import timm

    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        act_layer="gelu_tanh",
        dynamic_img_size=False,
    )


def _zero_qkv_key_bias(vit: nn.Module) -> None:
    """Zero the key part of every qkv bias (spec §5.4: the DINO key bias is zeroed at load)."""
    with torch.no_grad():
        for blk in getattr(vit, "blocks", []):
            qkv = blk.attn.qkv
            if qkv.bias is not None:
                e = qkv.bias.shape[0] // 3
                qkv.bias[e : 2 * e].zero_()


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT + 5 trainable heads: ``[B,3,H,W]`` in [-1,1] → ``[B, 5·N]`` logits.

    The frozen backbone is held outside the module tree (not in ``state_dict``, not in
    ``parameters()``) and follows the input's device on first use. Use :func:`build_discriminator`
    or :meth:`load_backbone` to give it pretrained weights.
    """

    def __init__(self, backbone: nn.Module, hooks: Optional[Sequence[int]] = None, diffaug_prob: float = 1.0) -> None:
        super().__init__()
        backbone.eval().requires_grad_(False)
        self._backbone: Tuple[nn.Module] = (backbone,)
        depth = len(backbone.blocks)
        self.hooks = tuple(hooks) if hooks is not None else tuple(round((i + 1) * depth / 4) - 1 for i in range(4))
        self.embed_dim = int(backbone.embed_dim)
        self.img_size = int(backbone.patch_embed.img_size[0])
        self.heads = nn.ModuleList([_head(self.embed_dim) for _ in range(len(self.hooks) + 1)])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> nn.Module:
        """The frozen DINO ViT (not a registered submodule)."""
        return self._backbone[0]

    def load_backbone(self, source: Optional[str]) -> None:
        """Load DINO ViT-S/16 weights from `source` (file/dir) or ``$XQTOOL_DINO_DISC_WEIGHTS`` or the cache."""
        from xqtool.checkpoints.pretrained import load_backbone_weights

        load_backbone_weights(
            self.backbone,
            source,
            kind="DINO ViT-S/16 (discriminator)",
            env_var=DINO_DISC_ENV,
            config_key="loss.disc_weights",
            model_name="vit_small_patch16_224.dino",
        )
        _zero_qkv_key_bias(self.backbone)

    def _features(self, x: Tensor) -> List[Tensor]:
        vit = self.backbone
        p = next(vit.parameters())
        if p.device != x.device:
            vit.to(x.device)
        x = (x * 0.5 + 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        s = self.img_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            if h > s and w > s and bool(torch.rand(()) < 0.5):
                top = int(torch.randint(0, h - s + 1, ()))
                left = int(torch.randint(0, w - s + 1, ()))
                x = x[..., top : top + s, left : left + s]
            elif h > s:
                x = F.interpolate(x, size=(s, s), mode="area")
            else:
                x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        x = vit.patch_embed(x.to(p.dtype))
        x = vit._pos_embed(x)
        x = vit.norm_pre(x)
        feats = [x]
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if i in self.hooks:
                feats.append(x)
        n_prefix = getattr(vit, "num_prefix_tokens", 1)
        # patch tokens + cls token -> [B, E, N]
        return [(f[:, n_prefix:] + f[:, :1]).transpose(1, 2) for f in feats]

    def forward(self, x: Tensor) -> Tensor:
        feats = self._features(x)
        logits = [head(f.to(head[2].weight_orig.dtype)).flatten(1) for head, f in zip(self.heads, feats)]
        return torch.cat(logits, dim=1)


# ----------------------------------------------------------------------------- factory
def build_discriminator(
    disc_type: str,
    image_size: int,
    *,
    disc_weights: Optional[str] = None,
    allow_random: bool = False,
    overrides: Optional[Dict[str, Any]] = None,
) -> Optional[nn.Module]:
    """Build the discriminator named `disc_type` (``none`` → None).

    For ``dinodisc`` the frozen DINO ViT-S/16 is loaded from `disc_weights`, ``$XQTOOL_DINO_DISC_WEIGHTS``
    or the cache (WeightsMissingError otherwise) unless `allow_random` (tests) keeps random weights.
    """
    ov = dict(overrides or {})
    if disc_type == "none":
        return None
    if disc_type == "patchgan":
        return PatchGANDiscriminator(ndf=int(ov.get("ndf", 64)), n_layers=int(ov.get("n_layers", 3)))
    if disc_type == "stylegan":
        return StyleGANDiscriminator(
            image_size, base_channels=int(ov.get("base_channels", 64)), max_channels=int(ov.get("max_channels", 512))
        )
    if disc_type == "dinodisc":
        backbone = build_dino_backbone(
            img_size=int(ov.get("img_size", 224)),
            patch_size=int(ov.get("patch_size", 16)),
            embed_dim=int(ov.get("embed_dim", 384)),
            depth=int(ov.get("depth", 12)),
            num_heads=int(ov.get("num_heads", 6)),
        )
        disc = DinoDiscriminator(backbone, hooks=ov.get("hooks"))
        if not allow_random or disc_weights or os.environ.get(DINO_DISC_ENV):
            disc.load_backbone(disc_weights)
        return disc
    raise ConfigError(f"loss.disc_type must be one of {', '.join(DISC_TYPES)}, got {disc_type!r}")


def dino_disc_weights_available(source: Optional[str]) -> bool:
    """True when DINO discriminator weights can be found (path, env var, or cache) without network."""
    from xqtool.checkpoints.pretrained import weights_available

    return weights_available(source, env_var=DINO_DISC_ENV)

__all__ = [
    "DISC_TYPES",
    "BatchNormLocal",
    "DinoDiscriminator",
    "PatchGANDiscriminator",
    "StyleGANDiscriminator",
    "build_discriminator",
    "build_dino_backbone",
]
