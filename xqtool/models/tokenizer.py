"""XQTokenizer: encoder → product of multi-scale quantizers → decoder (XQ-GAN, spec §2–3).

Shapes: images ``[B, 3, S, S]`` in [-1, 1]; P product branches; each branch a ``[B, D, H, W]`` latent
map (H = W = last scale); tokens ``[B, P, L]`` with L = Σ pn² (scales coarse to fine, row-major).

* ViT (DINOv2) path: the encoder emits P·N latent tokens ``[B, P·N, E]``; a shared 1×1 ``quant_conv``
  maps E → D per token; token group i (rows i·N … (i+1)·N − 1) is branch i's H×W map (token-level
  product split). ``post_quant_conv`` maps the channel-concatenated branches P·D → E.
* CNN path: the encoder emits ``[B, z, H, W]``; ``quant_conv`` maps z → P·D and the channels are split
  into P branches (channel-level product split; the reference cannot do P > 1 with a CNN).

Frozen teachers are never built here: they belong to training (``xqtool.models.teachers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from xqtool.config import ModelConfig, QuantConfig, TokenizerConfig, arch_hash, cnn_ch_mult, config_to_dict
from xqtool.errors import TokenError
from xqtool.quantize import ProductQuantizer, build_branch_quantizer


@dataclass(frozen=True)
class LatentPerturbation:
    """RobustTok latent perturbation for one training forward (spec §3.6): the first ⌊B·beta⌋ samples get
    codes replaced by random near neighbours (``delta`` candidates, strength ``alpha``). The training schedule
    (:func:`xqtool.training.schedules.robusttok_perturbation`) decides the values per epoch."""

    alpha: float
    beta: float
    delta: int


@dataclass
class TokenizerOutput:
    """Training forward result.

    Attributes:
        recon: ``[B, 3, S, S]`` reconstruction, NOT clamped (losses use it raw).
        loss: quantizer loss terms ``vq``, ``commit``, ``entropy`` (averaged over branches).
        stats: ``usage`` ``[P, S]`` and ``perplexity`` ``[P, S]`` (detached).
        semantic: ``[B, D, H, W]`` straight-through output of the last (semantic) branch.
        detail: ``[B, D, H, W]`` straight-through output of branch 0.
        indices: ``[B, P, L]`` token ids.
        n_drop: the first ``n_drop`` = ⌊B·codebook_drop⌋ samples (training mode) are quantizer-dropout samples
            (scales dropped only when S > 1 and P > 1); the semantic losses skip them in every case (spec §5.2).
    """

    recon: Tensor
    loss: Dict[str, Tensor]
    stats: Dict[str, Tensor]
    semantic: Tensor
    detail: Tensor
    indices: Tensor
    n_drop: int


def _vit_overrides(m: ModelConfig) -> Dict[str, int]:
    out: Dict[str, int] = {}
    if m.vit_embed_dim is not None:
        out["embed_dim"] = m.vit_embed_dim
    if m.vit_depth is not None:
        out["depth"] = m.vit_depth
    if m.vit_num_heads is not None:
        out["num_heads"] = m.vit_num_heads
    return out


class XQTokenizer(nn.Module):
    """Hierarchical XQ-GAN tokenizer built from its two config sections (random init, no network).

    Args:
        model_cfg: the ``model`` section (encoder/decoder architecture, spec §2).
        quant_cfg: the ``quant`` section (product of multi-scale quantizers, spec §3).

    Both are expected to come from a validated :class:`~xqtool.config.TokenizerConfig` (every bound is checked
    there, once); the tokenizer keeps only these two sections, never the training settings.

    Attributes (facts of the architecture): ``scales`` (coarse → fine), ``num_branches`` P, ``codebook_size`` K,
    ``embed_dim`` D, ``latent_side`` H = W, ``tokens_per_branch`` L = Σ pn², ``image_size`` S, ``model_cfg``,
    ``quant_cfg``.
    """

    def __init__(self, model_cfg: ModelConfig, quant_cfg: QuantConfig) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.quant_cfg = quant_cfg
        m, q = model_cfg, quant_cfg
        P, D = q.product_quant, q.codebook_embed_dim
        scales = tuple(q.v_patch_nums)
        side = scales[-1]
        self.scales: Tuple[int, ...] = scales
        self.num_branches: int = P
        self.codebook_size: int = q.codebook_size
        self.embed_dim: int = D
        self.latent_side: int = side
        self.tokens_per_branch: int = sum(p * p for p in scales)
        self.image_size: int = m.image_size
        self.is_vit = m.enc_type == "dinov2"

        if self.is_vit:
            from xqtool.models.vit import ViTDecoder, ViTEncoder

            overrides = _vit_overrides(m)
            self.encoder = ViTEncoder(
                m.encoder_model,
                image_size=m.image_size,
                patch_size=m.vit_patch_size,
                num_latent_tokens=side * side,
                num_branches=P,
                abs_pos_embed=m.abs_pos_embed,
                drop_path_rate=m.drop_path_rate,
                **overrides,
            )
            self.decoder = ViTDecoder(
                m.decoder_model,
                image_size=m.image_size,
                patch_size=m.vit_patch_size,
                num_latent_tokens=side * side,
                abs_pos_embed=m.abs_pos_embed,
                drop_path_rate=m.drop_path_rate,
                **overrides,
            )
            self.quant_conv = nn.Conv2d(self.encoder.embed_dim, D, 1)
            self.post_quant_conv = nn.Conv2d(P * D, self.decoder.embed_dim, 1)
        else:
            from xqtool.models.cnn import CNNDecoder, CNNEncoder

            ch_mult = cnn_ch_mult(m)
            self.encoder = CNNEncoder(
                ch=m.ch, ch_mult=ch_mult, num_res_blocks=m.num_res_blocks, z_channels=m.z_channels, dropout=m.dropout_p
            )
            self.decoder = CNNDecoder(
                ch=m.ch, ch_mult=ch_mult, num_res_blocks=m.num_res_blocks, z_channels=m.z_channels, dropout=m.dropout_p
            )
            self.quant_conv = nn.Conv2d(m.z_channels, P * D, 1)
            self.post_quant_conv = nn.Conv2d(P * D, m.z_channels, 1)

        branches = [
            build_branch_quantizer(
                codebook_size=q.codebook_size,
                dim=D,
                scales=scales,
                side=side,
                lfq=q.lfq,
                l2_norm=q.codebook_l2_norm,
                beta=q.commit_loss_beta,
                share_quant_resi=q.share_quant_resi,
                entropy_weight=q.entropy_loss_ratio,
                soft_entropy=q.soft_entropy,
                scale=q.scale,
            )
            for _ in range(P)
        ]
        self.quantizer = ProductQuantizer(branches, codebook_drop=q.codebook_drop, start_drop=q.start_drop)
        self.perturbs = q.alpha > 0 and q.beta > 0 and len(scales) == 1  # multi-scale: see config.ignored_settings

    # ------------------------------------------------------------------ facts
    @property
    def last_layer(self) -> Tensor:
        """Decoder's last weight (the adaptive GAN weight differentiates against it)."""
        return self.decoder.last_layer

    def config_hash(self) -> str:
        """12-hex fingerprint of the architecture (:func:`xqtool.config.config_hash` of its sections)."""
        return arch_hash(self.model_cfg, self.quant_cfg)

    def config_dict(self) -> Dict[str, Dict[str, object]]:
        """The two sections this tokenizer was built from, as plain nested dicts (``{"model": …, "quant": …}``)."""
        return {"model": config_to_dict(self.model_cfg), "quant": config_to_dict(self.quant_cfg)}

    def token_spec(self) -> Dict[str, object]:
        """What a token array from this tokenizer looks like (for manifests and checks)."""
        return {
            "config_hash": self.config_hash(),
            "scales": list(self.scales),
            "num_branches": self.num_branches,
            "codebook_size": self.codebook_size,
            "tokens_per_branch": self.tokens_per_branch,
            "image_size": self.image_size,
        }

    # ------------------------------------------------------------------ encoder side
    def encode_latents(self, images: Tensor) -> List[Tensor]:
        """Pre-quantization latents: list of P maps ``[B, D, H, W]`` (float32)."""
        self._check_images(images)
        P, H = self.num_branches, self.latent_side
        if self.is_vit:
            tokens = self.encoder(images)  # [B, P*N, E]
            B, PN, E = tokens.shape
            x = tokens.reshape(B, PN, 1, E).permute(0, 3, 1, 2)  # [B, E, P*N, 1]
            x = self._quant_conv_fp32(x)  # [B, D, P*N, 1]
            chunks = x.chunk(P, dim=2)
            return [c.reshape(B, -1, H, H) for c in chunks]
        h = self._quant_conv_fp32(self.encoder(images))  # [B, P*D, H, W]
        return list(h.chunk(P, dim=1))

    def _quant_conv_fp32(self, x: Tensor) -> Tensor:
        """The 1×1 ``quant_conv`` in fp32 even under autocast: code search is sensitive to rounding here."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.quant_conv(x.float())

    def encode_features(self, images: Tensor) -> Tensor:
        """Pre-quantization features ``[B, P, D, H, W]`` (for linear probing)."""
        return torch.stack(self.encode_latents(images), dim=1)

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` in [-1, 1] → token ids ``[B, P, L]`` (long)."""
        return self.quantizer.quantize(self.encode_latents(images))

    # ------------------------------------------------------------------ decoder side
    def decode_fhat_raw(self, f_hat: Tensor) -> Tensor:
        """Quantized map ``[B, P*D, H, W]`` → unclamped images ``[B, 3, S, S]``."""
        x = self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))
        if self.is_vit:
            x = x.flatten(2).transpose(1, 2)  # [B, N, E], token r*W + c = position (r, c)
        return self.decoder(x).float()

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """Quantized map ``[B, P*D, H, W]`` → images ``[B, 3, S, S]`` clamped to [-1, 1]."""
        return self.decode_fhat_raw(f_hat).clamp(-1.0, 1.0)

    @torch.inference_mode()
    def decode(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, P, L]`` → images ``[B, 3, S, S]`` in [-1, 1] (TokenError on bad ids/shape)."""
        tokens = self._as_tokens(tokens)
        return self.decode_fhat(self.quantizer.tokens_to_fhat(tokens))

    @torch.inference_mode()
    def decode_each(self, tokens: Tensor) -> Tensor:
        """Batch-size-invariant :meth:`decode`: token ids ``[B, P, L]`` -> images ``[B, 3, S, S]`` in [-1, 1].

        Each row is turned into f_hat and decoded on its own, so an image's float rounding (and its PNG
        bytes) never depends on which other rows share the batch (conv/matmul kernels block by batch size).
        """
        tokens = self._as_tokens(tokens)
        return torch.cat([self.decode(tokens[j : j + 1]) for j in range(tokens.shape[0])], dim=0)

    @torch.inference_mode()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Images → tokens → images, all scales (``== decode(encode(images))``)."""
        return self.decode_fhat(self.quantizer.tokens_to_fhat(self.quantizer.quantize(self.encode_latents(images))))

    @torch.inference_mode()
    def decode_progressive(self, tokens: Tensor, branches: Optional[Sequence[int]] = None) -> List[Tensor]:
        """Coarse-to-fine reconstructions: one ``[B, 3, S, S]`` image batch per scale.

        Image k decodes the cumulative quantized map after scale k; with `branches`, only those
        branches contribute (the others are zeroed).
        """
        tokens = self._as_tokens(tokens)
        maps = self.quantizer.tokens_to_fhat(tokens, cumulative=True)
        D = self.embed_dim
        if branches is not None:
            keep = torch.zeros(self.num_branches * D, dtype=torch.bool, device=tokens.device)
            for b in branches:
                if not 0 <= b < self.num_branches:
                    raise TokenError(f"branch {b} does not exist (the tokenizer has {self.num_branches})")
                keep[b * D : (b + 1) * D] = True
            maps = [f * keep.view(1, -1, 1, 1) for f in maps]
        return [self.decode_fhat(f) for f in maps]

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor, perturbation: Optional[LatentPerturbation] = None) -> TokenizerOutput:
        """Training forward: encode, quantize (with quantizer dropout in train mode), decode.

        With a `perturbation` (RobustTok, single-scale quantizer, training mode) the decoder sees perturbed
        latents (spec §3.6); losses and tokens use the clean quantization.
        """
        latents = self.encode_latents(images)
        q = self.quantizer(latents)
        decoder_input = q.quantized
        if perturbation is not None and self.perturbs and self.training:
            from xqtool.quantize.perturb import perturb_latent

            parts = [
                perturb_latent(branch, z, zq, alpha=perturbation.alpha, beta=perturbation.beta,
                               delta=perturbation.delta)
                for branch, z, zq in zip(self.quantizer.quantizes, latents, q.branch_outputs)
            ]
            decoder_input = torch.cat(parts, dim=1)
        recon = self.decode_fhat_raw(decoder_input)
        return TokenizerOutput(
            recon=recon,
            loss=q.loss,
            stats=q.stats,
            semantic=q.branch_outputs[-1],
            detail=q.branch_outputs[0],
            indices=q.indices,
            n_drop=q.n_drop,
        )

    # ------------------------------------------------------------------ checks
    def _check_images(self, images: Tensor) -> None:
        S = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (S, S):
            raise TokenError(
                f"images must be [B, 3, {S}, {S}] for this tokenizer, got {list(images.shape)}"
            )

    def _as_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TokenError(f"token ids must be integers, got {tokens.dtype}")
        expected = (self.num_branches, self.tokens_per_branch)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise TokenError(
                f"tokens must be [N, {expected[0]}, {expected[1]}] (P branches x L tokens) for this tokenizer, "
                f"got {list(tokens.shape)}"
            )
        return tokens.to(device=self.post_quant_conv.weight.device, dtype=torch.long)


def build_tokenizer(config: TokenizerConfig) -> XQTokenizer:
    """Random-init tokenizer from the ``model`` and ``quant`` sections of a validated `config` (no pretrained
    weights, no teachers, no network)."""
    return XQTokenizer(config.model, config.quant)


