"""LPIPS (VGG16, v0.1 linear heads) perceptual distance, built offline (spec tokenizer.md §5.1).

The network is torchvision's VGG16 ``features`` (random init, never downloaded) split after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3, plus five 1×1 linear heads ``lin0..lin4`` (64, 128, 256, 512, 512 → 1,
no bias). Inputs in [-1, 1] are shifted/scaled by (-0.030, -0.088, -0.188) / (0.458, 0.448, 0.450); each
feature map is unit-normalised over channels, the squared difference goes through the head, is averaged
over space and summed over the five layers.

Weights are loaded, in this order, from:

1. ``weights=`` (a file, a folder or ``hf://OWNER/REPO/FILE``), else ``$XQTOOL_LPIPS_WEIGHTS``;
2. the cache: ``~/.cache/xqtool/lpips/`` (``lpips_vgg.safetensors``/``lpips_vgg.pth`` = full module,
   or ``vgg.pth`` = LPIPS v0.1 heads), the installed ``lpips`` package's ``weights/v0.1/vgg.pth``.

A file may hold the full module (keys ``features.*``/``net.sliceK.*`` and ``lin*``) or only the heads
(official ``vgg.pth``: ``lin{k}.model.1.weight``); in the latter case the ImageNet VGG16 backbone comes from
``vgg_weights=``, ``$XQTOOL_VGG16_WEIGHTS`` (also ``hub`` = timm's ``vgg16.tv_in1k`` or ``hf://...``) or the torch hub
cache (``vgg16-397923af.pth``).
When nothing is found, :class:`~xqtool.errors.WeightsMissingError` says where to put the files, unless
``allow_random=True`` (tests), which keeps random weights and logs a warning.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from xqtool.errors import WeightsMissingError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

LPIPS_ENV = "XQTOOL_LPIPS_WEIGHTS"
VGG_ENV = "XQTOOL_VGG16_WEIGHTS"
VGG_HUB_NAME = "vgg16-397923af.pth"
VGG_TIMM_NAME = "vgg16.tv_in1k"  # timm's Hub copy of torchvision's VGG16 (same features.* keys)
CHANNELS = (64, 128, 256, 512, 512)
# indices of the last module (inclusive) of each slice in torchvision's vgg16().features
_SLICE_ENDS = (3, 8, 15, 22, 29)
_FULL_NAMES = ("lpips_vgg.safetensors", "lpips_vgg.pth")


class NetLinLayer(nn.Module):
    """Dropout (inactive in eval) + 1×1 conv C→1 without bias; keys ``model.1.weight`` as in LPIPS v0.1."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "xqtool" / "lpips"


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a user error
        raise WeightsMissingError(f"cannot read LPIPS/VGG weights {path}: {exc}".splitlines()[0]) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsMissingError(f"{path} does not hold a state_dict")
    return sd


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map official LPIPS / taming keys to this module's names (``net.sliceK.i.*`` → ``features.i.*``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("module.").removeprefix("perceptual_loss.")
        m = re.match(r"net\.slice\d\.(\d+)\.(weight|bias)$", k)
        if m:
            k = f"features.{m.group(1)}.{m.group(2)}"
        if k.startswith("scaling_layer.") or k.startswith("classifier."):
            continue
        out[k] = v
    return out


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance.

    ``forward(x, y)``: images ``[B, 3, H, W]`` in [-1, 1] → distances ``[B]`` (gradients flow to the inputs,
    never to the weights). Always in eval mode.
    """

    def __init__(
        self,
        weights: Optional[PathLike] = None,
        allow_random: bool = False,
        vgg_weights: Optional[PathLike] = None,
    ):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        # torchvision's VGG16 'features' (config "D"), without allocating the 120M-parameter classifier
        self.features = make_layers(cfgs["D"], batch_norm=False)[: _SLICE_ENDS[-1] + 1]
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", NetLinLayer(c))
        with torch.no_grad():  # random heads stay non-negative so that d >= 0 even without weights
            for i in range(len(CHANNELS)):
                w = getattr(self, f"lin{i}").model[1].weight
                w.copy_(w.abs())
        self.source = self._load(weights, vgg_weights, allow_random)
        self.requires_grad_(False)
        self.eval()

    # -- loading -------------------------------------------------------------------------------
    def _load(self, weights: Optional[PathLike], vgg_weights: Optional[PathLike], allow_random: bool) -> str:
        lin_path = self._find_lpips_file(weights)
        if lin_path is None:
            if allow_random:
                log.warning("LPIPS weights not found; using RANDOM weights (allow_random=True, tests only)")
                return "random"
            raise WeightsMissingError(
                f"LPIPS weights not found: set ${LPIPS_ENV} or loss.lpips_weights to LPIPS v0.1 'vgg.pth' "
                f"(or a full lpips_vgg.safetensors), or put it in {_cache_dir()}"
            )
        sd = _normalise_keys(_load_state(lin_path))
        has_backbone = any(k.startswith("features.") for k in sd)
        if not has_backbone:
            vgg_path = self._find_vgg_file(vgg_weights)
            if vgg_path is None:
                if allow_random:
                    log.warning("VGG16 ImageNet weights not found; LPIPS backbone is RANDOM (allow_random=True)")
                else:
                    raise WeightsMissingError(
                        f"{lin_path} holds only the LPIPS heads; the ImageNet VGG16 backbone '{VGG_HUB_NAME}' "
                        f"is missing: set ${VGG_ENV} or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
                    )
            else:
                vsd = _normalise_keys(_load_state(vgg_path))
                sd.update({k: v for k, v in vsd.items() if k.startswith("features.")})
        own = self.state_dict()
        sd = {k: v for k, v in sd.items() if k in own}
        missing = [k for k in own if k not in sd]
        if missing and not allow_random:
            raise WeightsMissingError(f"LPIPS weights {lin_path} lack {len(missing)} tensors (e.g. '{missing[0]}')")
        bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise WeightsMissingError(f"LPIPS weights {lin_path}: wrong shape for '{bad[0]}'")
        self.load_state_dict(sd, strict=False)
        return str(lin_path)

    @staticmethod
    def _find_lpips_file(weights: Optional[PathLike]) -> Optional[Path]:
        explicit = weights if weights is not None else os.environ.get(LPIPS_ENV) or None
        from xqtool.hub import resolve_weights_reference  # hf://OWNER/REPO/FILE through the Hub cache

        hub_file = resolve_weights_reference(explicit, label="LPIPS")
        if hub_file is not None:
            return hub_file
        if explicit is not None:
            p = Path(explicit).expanduser()
            if p.is_dir():
                for name in (*_FULL_NAMES, "vgg.pth"):
                    if (p / name).is_file():
                        return p / name
            if not p.is_file():
                raise WeightsMissingError(
                    f"LPIPS weights not found at {p}: give LPIPS v0.1 'vgg.pth' or a full lpips_vgg.safetensors"
                )
            return p
        cands = [_cache_dir() / n for n in (*_FULL_NAMES, "vgg.pth")]
        try:
            import lpips as _lp  # type: ignore[import-not-found]

            cands.append(Path(_lp.__file__).parent / "weights" / "v0.1" / "vgg.pth")
        except ImportError:
            pass
        return next((c for c in cands if c.is_file()), None)

    @staticmethod
    def _find_vgg_file(vgg_weights: Optional[PathLike]) -> Optional[Path]:
        explicit = vgg_weights if vgg_weights is not None else os.environ.get(VGG_ENV) or None
        from xqtool.hub import resolve_weights_reference  # 'hub' = timm's vgg16.tv_in1k (torchvision weights)

        hub_file = resolve_weights_reference(explicit, label="VGG16", model_name=VGG_TIMM_NAME)
        if hub_file is not None:
            return hub_file
        if explicit is not None:
            p = Path(explicit).expanduser()
            if p.is_dir():
                p = p / VGG_HUB_NAME
            if not p.is_file():
                raise WeightsMissingError(f"VGG16 weights not found at {p}: point it to {VGG_HUB_NAME}")
            return p
        c = Path(torch.hub.get_dir()) / "checkpoints" / VGG_HUB_NAME
        return c if c.is_file() else None

    # -- forward -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LPIPS":
        """LPIPS stays in eval mode (dropout off) whatever the parent module does."""
        return super().train(False)

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        # NCHW on purpose: channels-last ran VGG's convolutions and pooling ~25 % faster on the CPU, but made
        # a 2-process run's adaptive weight differ from the 1-process run's in some runs (tests/test_multiprocess)
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _SLICE_ENDS:
                out.append(h)
        return out

    @staticmethod
    def _unit(f: torch.Tensor) -> torch.Tensor:
        """Channel-normalise a feature map: f / (‖f‖₂ over channels + 1e-10)."""
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances ``[B]`` between images ``x``, ``y`` ``[B, 3, H, W]`` in [-1, 1].

        d(x, y) = Σ_k mean_hw lin_k((x̂_k − ŷ_k)²), with x̂_k the channel-normalised VGG16 features
        after slice k. Each image goes through VGG on its own; an input that does not require a
        gradient (the real image in training) runs without autograd, so no graph is kept for it and
        the backward never runs over it. With one side differentiated, each layer's distance and its
        gradient are computed by :class:`_UnitDistance` in a few fused passes (same formula).
        """
        y = y.to(x.dtype)
        if y.requires_grad and not x.requires_grad:
            x, y = y, x  # d is symmetric: differentiate through `x` only
        fx = self._feats(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):
            fy = [self._unit(f) for f in self._feats(y)]
        total = x.new_zeros(x.shape[0], dtype=_compute_dtype(x))
        for k, (a, b) in enumerate(zip(fx, fy)):
            w = getattr(self, f"lin{k}").model[1].weight
            if b.requires_grad:  # both sides differentiated: plain autograd
                d = torch.nn.functional.conv2d((self._unit(a) - b) ** 2, w).mean(dim=(1, 2, 3))
            else:
                d = _UnitDistance.apply(a, b, w.view(-1))
            total = total + d
        return total


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision features (mixed precision), else the features' own dtype."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class _UnitDistance(torch.autograd.Function):
    """mean_hw Σ_c w_c (f_c/(‖f‖+ε) − b_c)² per image, differentiable in ``f`` only (one LPIPS layer, spec
    tokenizer.md §5.1; Zhang et al. 2018).

    ``f [B,C,H,W]`` features, ``b`` the other image's channel-normalised features (no gradient), ``w [C]``
    the frozen head → ``[B]`` (fp32 for half-precision features, else their dtype). The backward is the
    closed form of the same expression: with n = ‖f‖, u = f/(n+ε) and g_u = −2 w (b − u)·ḡ/(HW),
    ∂d/∂f = (g_u − f·⟨g_u, f⟩/(n (n+ε))) / (n+ε), the second term taken as 0 where n = 0 (autograd of
    the formula gives NaN there).
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        dt = _compute_dtype(f)
        f32, b32 = f.to(dt), b.to(dt)
        n = f32.pow(2).sum(1, keepdim=True).sqrt_()
        den = n + 1e-10
        diff = torch.addcdiv(b32, f32, den, value=-1.0)  # b − u, [B,C,H,W] in f's memory format
        w4 = w.to(dt).view(1, -1, 1, 1)
        hw = f.shape[2] * f.shape[3]
        d = (diff * diff).mul_(w4).sum(dim=(1, 2, 3)).div_(hw)
        ctx.save_for_backward(f, diff, n, den, w4)
        ctx.hw = hw
        return d

    @staticmethod
    @torch.autograd.function.once_differentiable  # the closed form is first-order only
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        f, diff, n, den, w4 = ctx.saved_tensors
        f32 = f.to(diff.dtype)
        # g_u = ∂d/∂u = −2 w (b − u) ḡ / HW
        g_u = diff * (w4 * (grad.to(diff.dtype).view(-1, 1, 1, 1) * (-2.0 / ctx.hw)))
        proj = (g_u * f32).sum(1, keepdim=True)  # ⟨g_u, f⟩ over channels
        coef = torch.where(n > 0, proj / (n * den), torch.zeros_like(proj))
        g_f = torch.addcmul(g_u, f32, coef, value=-1.0).div_(den)
        return g_f.to(f.dtype), None, None


__all__ = ["LPIPS", "LPIPS_ENV", "VGG_ENV"]
