"""Frozen teacher ViTs for semantic (DINOv2) and detail (CLIP) regularisation (tokenizer spec §2.6, §5.2, §5.3).

A teacher takes images in [-1, 1], maps them to [0, 1], applies ImageNet normalisation (also for CLIP, as the
reference does) and returns the final-norm features of a frozen timm ViT created at 256 px / patch 16.
Weights come from :func:`xqtool.checkpoints.pretrained.load_backbone_weights` (never downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from xqtool.errors import ConfigError, WeightsMissingError
from xqtool.checkpoints.pretrained import PathLike, load_backbone_weights, resolve_weights
from xqtool.models.vit import build_vit_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherSpec:
    """Defaults of one teacher kind."""

    model_name: str
    env_var: str
    label: str
    config_key: str


TEACHERS: dict[str, TeacherSpec] = {
    "dinov2": TeacherSpec("vit_base_patch14_dinov2.lvd142m", "XQTOOL_DINOV2_WEIGHTS", "DINOv2", "loss.semantic_weights"),
    "clip": TeacherSpec("vit_base_patch16_clip_224.openai", "XQTOOL_CLIP_WEIGHTS", "CLIP", "loss.detail_weights"),
}


def teacher_spec(kind: str) -> TeacherSpec:
    """The :class:`TeacherSpec` of ``kind`` ('dinov2' | 'clip'); ConfigError otherwise."""
    try:
        return TEACHERS[kind]
    except KeyError:
        raise ConfigError(f"unknown teacher {kind!r}: use one of {', '.join(TEACHERS)}") from None


def teacher_weights_available(kind: str, weights: Optional[PathLike] = None, model_name: Optional[str] = None) -> bool:
    """True when weights for teacher ``kind`` can be found offline (explicit path, env var, or local cache).

    Lets the trainer fail before training starts; builds no model and reads no weights. With ``weights='hub'`` (or
    ``hf://...``) the file is fetched into the Hugging Face cache and a miss raises WeightsMissingError with the download
    command instead of returning False.
    """
    spec = teacher_spec(kind)
    try:
        path, _ = resolve_weights(model_name or spec.model_name, weights, spec.env_var)
    except WeightsMissingError:
        if weights is not None and str(weights).strip().lower().startswith(("hub", "hf:")):
            raise  # asked for the Hub: its message carries the download command
        return False
    return path is not None


class SemanticTeacher(nn.Module):
    """Frozen timm ViT teacher: ``forward(x [B, 3, S, S] in [-1, 1]) -> {"cls": [B, E], "patches": [B, N, E]}``.

    ``cls`` is the final-norm class token, ``patches`` the final-norm image tokens (row-major, N = (S/p)²).
    ``allow_random=True`` (tests only) keeps random init when no weights are found.
    """

    def __init__(
        self,
        kind: str = "dinov2",
        model_name: Optional[str] = None,
        image_size: int = 256,
        patch_size: int = 16,
        weights: Optional[PathLike] = None,
        allow_random: bool = False,
        **overrides: Any,
    ) -> None:
        super().__init__()
        spec = teacher_spec(kind)
        self.kind = kind
        self.model_name = model_name or spec.model_name
        self.model = build_vit_backbone(self.model_name, image_size, patch_size, drop_path_rate=0.0, **overrides)
        self.weights_path: Optional[str] = None
        try:
            self.weights_path = load_backbone_weights(
                self.model,
                weights,
                kind=spec.label,
                env_var=spec.env_var,
                config_key=spec.config_key,
                model_name=self.model_name,
            )
        except WeightsMissingError:
            if not allow_random or weights:
                raise
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.eval()

    @property
    def embed_dim(self) -> int:
        """Feature width E."""
        return int(self.model.embed_dim)

    def train(self, mode: bool = True) -> "SemanticTeacher":
        """Teachers always stay in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = ((x + 1.0) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.model.forward_features(x)  # [B, prefix + N, E] after the final norm
        n_prefix = self.model.num_prefix_tokens
        return {"cls": feats[:, 0], "patches": feats[:, n_prefix:]}
