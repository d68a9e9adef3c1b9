"""Image and tokenizer metrics: PSNR, SSIM, codebook usage, FID / KID / Inception Score.

The single owner of: the conversion of model outputs to pixels (:func:`to_uint8` ``[B, 3, H, W]`` tensor,
:func:`to_uint8_hwc` ``[B, H, W, 3]`` array), codebook usage / perplexity (:func:`usage_perplexity`, also used
by the quantizers' training stats; :func:`codebook_stats`, :func:`codebook_usage_metrics` for reports),
:func:`count_parameters`, the FID / KID / IS formulas and feature extractors with their preprocessing
(:func:`extractor_input`, :func:`image_features`). Reading and writing FID statistics files is
:mod:`xqtool.fid_stats`. Imports only :mod:`xqtool.errors` (and :mod:`xqtool.hub` lazily, for ``hf://``
Inception weights), so every layer (quantize, models, tasks) may import it.

Conventions
-----------
* Images given to :func:`psnr` / :func:`ssim` are float tensors ``[B, 3, H, W]`` in ``[-1, 1]``. Both are
  computed on the ``[0, 1]`` scale (``x -> (x + 1) / 2``, data range 1), which gives exactly the same dB
  values as PSNR on uint8 ``[0, 255]`` with data range 255. Results are per image, ``[B]`` float64.
* PSNR of identical images is capped at :data:`PSNR_CAP_DB` (100 dB; the MSE is floored at 1e-10) so that
  dataset means stay finite.
* SSIM follows Wang et al. 2004 with the usual settings (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  population covariances), per channel then averaged over channels; only positions where the whole window
  fits are averaged. This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)``.
* Features for FID/KID/IS come from a :class:`FeatureExtractor`: any callable mapping images whose values
  are in ``[0, 255]`` (uint8 or float) ``[B, 3, H, W]`` to features ``[B, F]``. The real one is clean-fid's
  Inception (:func:`inception_extractor`), loaded only from local files (never the network). Tests inject a
  tiny extractor.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from xqtool.errors import ConfigError, DataError, WeightsMissingError

log = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0
"""PSNR returned for (near-)identical images: the MSE on the [0, 1] scale is floored at 1e-10."""

ArrayLike = Union[np.ndarray, torch.Tensor]

FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")

INCEPTION_ENV = "XQTOOL_INCEPTION_WEIGHTS"
TORCHSCRIPT_INCEPTION_NAME = "inception-2015-12-05.pt"
PYTORCH_INCEPTION_NAME = "pt_inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------
# Pixel metrics
# ----------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB.

    Args:
        a, b: images ``[B, C, H, W]`` in ``[-1, 1]``.
        cap_db: value returned where the MSE is ~0 (default 100 dB).
    Returns:
        ``[B]`` float64 tensor (on the [0, 1] scale == uint8 scale with range 255).
    """
    _check_pair(a, b)
    x = (a.detach().double() + 1.0) / 2.0
    y = (b.detach().double() + 1.0) / 2.0
    mse = (x - y).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return out.clamp(max=cap_db)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = (size - 1) / 2.0
    x = torch.arange(size, dtype=dtype, device=device) - r
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM (mean over channels and valid window positions).

    Args:
        a, b: images ``[B, C, H, W]`` in ``[-1, 1]`` (computed on the [0, 1] scale, data range 1).
        win_size: Gaussian window size (odd); shrunk to the largest odd size <= min(H, W) for tiny images.
    Returns:
        ``[B]`` float64 tensor; 1 for identical images.
    """
    _check_pair(a, b)
    _, c, h, w = a.shape
    win_size = min(win_size, h, w)
    if win_size % 2 == 0:
        win_size -= 1
    x = (a.detach().double() + 1.0) / 2.0
    y = (b.detach().double() + 1.0) / 2.0
    g = _gaussian_window(win_size, sigma, x.dtype, x.device)
    kh = g.view(1, 1, win_size, 1).expand(c, 1, win_size, 1)
    kw = g.view(1, 1, 1, win_size).expand(c, 1, 1, win_size)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = k1**2, k2**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(2).mean(2).mean(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> uint8 tensor ``[B, 3, H, W]`` (channels first, same device).

    ``round(127.5 x + 127.5)`` after clamping to [-1, 1] (not the +128 defect). This is the one conversion
    of model outputs to pixels: metrics, feature extractors, PNG/npz writers (through :func:`to_uint8_hwc`).
    """
    return ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8_hwc(images: torch.Tensor, *, truncate: bool = False) -> np.ndarray:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> uint8 numpy array ``[B, H, W, 3]`` (channels last, on the CPU),
    the layout image files and ``.npz`` sample batches use.

    Default: :func:`to_uint8` (rounded). ``truncate``: the reference's conversion (var.md §4, §7.12), in
    float32 and in its order: image = (x + 1)/2 in [0, 1], then clamp(255·image, 0, 255) cast to uint8
    (truncation toward zero), so ``sample --upstream-rng`` reproduces the original's pixel values.
    """
    if truncate:
        x = ((images.detach().float().clamp(-1, 1) + 1) / 2).mul(255).clamp(0, 255).to(torch.uint8)
    else:
        x = to_uint8(images)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, H, W]`` in [-1, 1] (``x / 127.5 - 1``)."""
    return images.float() / 127.5 - 1.0


def count_parameters(module: torch.nn.Module, prefix: Union[str, tuple[str, ...]] = "") -> int:
    """Number of parameters of `module` whose name starts with `prefix` (or any of several prefixes; all when
    empty). Works on the meta device."""
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


# ----------------------------------------------------------------------------------------------
# Codebook statistics
# ----------------------------------------------------------------------------------------------


def usage_perplexity(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook usage and perplexity of a code histogram ``[K]`` (counts, any float dtype, any device).

    Returns 0-d tensors in `hist`'s dtype: usage = fraction of the K codes with a non-zero count; perplexity =
    exp(entropy of the normalised histogram) (K for a uniform histogram, 1 for one code, 1 for an empty one).
    The single definition used by the quantizers' training stats (spec §3.1) and the evaluation reports.
    """
    usage = (hist > 0).to(hist.dtype).mean()
    p = hist / hist.sum().clamp_min(1.0)
    return usage, torch.exp(torch.special.entr(p).sum())


def codebook_stats(indices: ArrayLike, K: int) -> dict[str, float]:
    """Usage and perplexity (:func:`usage_perplexity`) of code indices.

    Args:
        indices: integer array/tensor of any shape with values in ``[0, K)``.
        K: codebook size.
    Returns:
        ``{"usage": fraction of the K codes used at least once, "perplexity": exp(entropy of the code
        histogram)}``; both 0 for no indices.
    Raises:
        ValueError: an index outside ``[0, K)``.
    """
    idx = torch.as_tensor(np.asarray(indices) if isinstance(indices, np.ndarray) else indices).reshape(-1).long()
    if idx.numel() == 0:
        return {"usage": 0.0, "perplexity": 0.0}
    if int(idx.min()) < 0 or int(idx.max()) >= K:
        raise ValueError(f"indices out of range [0, {K})")
    usage, perplexity = usage_perplexity(torch.bincount(idx.cpu(), minlength=K).double())
    return {"usage": float(usage), "perplexity": float(perplexity)}


def code_histogram(tokens: torch.Tensor, K: int, scales: Optional[Sequence[int]]) -> torch.Tensor:
    """Exact code counts of token ids ``[N, P, L]`` (L = sum of scale sides squared, coarse to fine)
    -> LongTensor ``[P, S, K]``: how often each code appears at each scale of each branch. Histograms of
    several batches (or processes) add up. ``scales=None``: all L positions form one group (S = 1)."""
    tokens = torch.as_tensor(tokens).long()
    n, P, L = tokens.shape
    if scales is None:
        return torch.stack([torch.bincount(tokens[:, b].reshape(-1), minlength=K)[:K] for b in range(P)])[:, None]
    if L != sum(int(p) * int(p) for p in scales):
        raise ValueError(f"tokens have {L} positions per branch, scales {list(scales)} need {sum(p * p for p in scales)}")
    hist = torch.zeros(P, len(scales), K, dtype=torch.long, device=tokens.device)
    offs = 0
    for si, pn in enumerate(scales):
        ids = tokens[:, :, offs : offs + pn * pn]
        for b in range(P):
            hist[b, si] += torch.bincount(ids[:, b].reshape(-1), minlength=K)[:K]
        offs += pn * pn
    return hist


def _perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a count vector ``[K]``; 0 when it is empty (no codes counted)."""
    if float(counts.sum()) <= 0:
        return 0.0
    return float(usage_perplexity(counts.double())[1])


def codebook_usage_metrics(hist: torch.Tensor) -> Dict[str, Any]:
    """Report-side codebook usage of a histogram ``[P, S, K]`` from :func:`code_histogram`.

    One definition per name (exact counts over the whole evaluated set, never per batch):

    * ``codes_used`` ``[P]``: number of distinct codes of branch p that appear at least once, any scale;
    * ``codebook_usage`` ``[P]``: ``codes_used / K``;
    * ``codes_used_per_scale`` ``[P][S]`` and ``codebook_usage_per_scale`` ``[P][S]``: the same at each scale;
    * ``codebook_perplexity`` ``[P]`` / ``codebook_perplexity_per_scale`` ``[P][S]``: exp(entropy) of the counts.

    (The training-time EMA usage of spec §3.1/§3.5 is a different quantity, logged under its own name.)
    """
    hist = hist.detach().long().cpu()
    P, S, K = hist.shape
    per_scale = (hist > 0).sum(-1)                 # [P, S]
    union = (hist.sum(1) > 0).sum(-1)              # [P]
    return {
        "codes_used": [int(v) for v in union],
        "codebook_usage": [int(v) / K for v in union],
        "codes_used_per_scale": [[int(v) for v in row] for row in per_scale],
        "codebook_usage_per_scale": [[int(v) / K for v in row] for row in per_scale],
        "codebook_perplexity": [_perplexity(hist[b].sum(0)) for b in range(P)],
        "codebook_perplexity_per_scale": [[_perplexity(hist[b, s]) for s in range(S)] for b in range(P)],
    }


# ----------------------------------------------------------------------------------------------
# Distribution metrics
# ----------------------------------------------------------------------------------------------


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and covariance ``[F, F]`` (unbiased, as clean-fid/ADM) of features ``[N, F]``."""
    f = _np(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DataError(f"need at least 2 images to compute FID statistics, got features of shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: ArrayLike, s1: ArrayLike, mu2: ArrayLike, s2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2) (clean-fid's numerically stable formula).

    Args:
        mu1, mu2: means ``[F]``; s1, s2: covariances ``[F, F]``.
    """
    from scipy import linalg

    m1, m2 = np.atleast_1d(_np(mu1)), np.atleast_1d(_np(mu2))
    c1, c2 = np.atleast_2d(_np(s1)), np.atleast_2d(_np(s2))
    if m1.shape != m2.shape or c1.shape != c2.shape:
        raise DataError(
            f"feature statistics do not match ({m1.shape[0]} vs {m2.shape[0]} dims): "
            "both sides must use the same feature extractor"
        )
    # Same formula as clean-fid/pytorch-fid/ADM (clean-fid's own copy calls sqrtm(disp=False), which
    # SciPy >= 1.16 no longer supports, hence this local implementation).
    diff = m1 - m2
    covmean = linalg.sqrtm(c1.dot(c2))
    if not np.isfinite(covmean).all():
        log.warning("FID: singular covariance product; adding 1e-6 to the diagonals")
        offset = np.eye(c1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((c1 + offset).dot(c2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("FID: sqrtm has an imaginary component up to %.3g", float(np.max(np.abs(covmean.imag))))
        covmean = covmean.real
    fd = diff.dot(diff) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))


def fid_from_features(f1: ArrayLike, f2: ArrayLike) -> float:
    """FID between two feature sets ``[N1, F]`` and ``[N2, F]``.

    When both sets are smaller than the feature dimension (quick runs, tests), the exact low-rank identity
    ``tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((N1-1)(N2-1))`` (A = centred features) replaces the F×F matrix
    square root; otherwise this is :func:`frechet_distance` on the feature statistics.
    """
    x1, x2 = _np(f1), _np(f2)
    mu1, s1 = feature_stats(x1)
    mu2, s2 = feature_stats(x2)
    n1, n2, dim = x1.shape[0], x2.shape[0], x1.shape[1]
    if x2.shape[1] != dim or max(n1, n2) >= dim:
        return frechet_distance(mu1, s1, mu2, s2)
    a1, a2 = x1 - mu1, x2 - mu2
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    fd = diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def kernel_inception_distance(
    f1: ArrayLike, f2: ArrayLike, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """KID (polynomial kernel, cubic; the clean-fid / StyleGAN estimator) with a seeded subset sampler."""
    x1, x2 = _np(f1), _np(f2)
    n = x1.shape[1]
    m = min(x1.shape[0], x2.shape[0], max_subset_size)
    if m < 2:
        raise DataError("KID needs at least 2 images on each side")
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = x2[rng.choice(x2.shape[0], m, replace=False)]
        y = x1[rng.choice(x1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def inception_score(probs: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) from class probabilities ``[N, C]``."""
    p = _np(probs)
    splits = max(1, min(splits, p.shape[0]))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(part + 1e-12) - np.log(py + 1e-12))
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images ``[B, 3, H, W]`` with values in ``[0, 255]`` (uint8 or float) -> features ``[B, F]``.

    Optional attributes used when present:
      * ``name: str`` — written into reports.
      * ``preprocess(img: np.ndarray[H, W, 3] uint8) -> np.ndarray[h, w, 3]`` — per-image CPU resize run in
        data-loader workers before batching (clean-fid's mode-specific resizer for Inception).
      * ``classify(features [B, F]) -> probs [B, C]`` — enables the Inception Score.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TorchFeatureExtractor:
    """Wrap any ``nn.Module``/callable as a :class:`FeatureExtractor` (useful for tests and custom backbones).

    ``fn`` receives float images in [0, 255] ``[B, 3, H, W]`` on `device` and returns ``[B, F]``.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str = "custom"
    device: Union[str, torch.device] = "cpu"
    preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None
    classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return self.fn(x).reshape(x.shape[0], -1).float().cpu()


def _default_cache_dirs() -> list[Path]:
    # Not /tmp (clean-fid's download folder): anyone can write there, and the TorchScript file runs as code.
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]  # torch hub cache (pytorch-fid weights)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    dirs.append(Path(xdg) / "xqtool")
    return dirs


def resolve_inception_weights(weights: Optional[Union[str, os.PathLike]] = None, mode: str = "clean") -> Path:
    """Find the local Inception file for `mode` without touching the network.

    Order: `weights` (file, a folder holding the file, or ``hf://OWNER/REPO/FILE``) → ``$XQTOOL_INCEPTION_WEIGHTS``
    → torch hub cache (``~/.cache/torch/hub/checkpoints``) → ``~/.cache/xqtool``. clean-fid's own download
    (``/tmp/inception-2015-12-05.pt``) is not searched: ``/tmp`` is world-writable and the TorchScript file is
    code; move it to one of those folders or pass it explicitly. ``clean`` / ``legacy_tensorflow`` need the TorchScript file
    ``inception-2015-12-05.pt``; ``legacy_pytorch`` needs pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
    """
    if mode not in FID_MODES:
        raise ConfigError(f"unknown FID mode '{mode}': use one of {', '.join(FID_MODES)}")
    fname = PYTORCH_INCEPTION_NAME if mode == "legacy_pytorch" else TORCHSCRIPT_INCEPTION_NAME
    explicit = weights if weights is not None else os.environ.get(INCEPTION_ENV) or None
    from xqtool.hub import resolve_weights_reference  # hf://OWNER/REPO/FILE through the Hub cache

    hub_file = resolve_weights_reference(explicit, label=f"Inception ({fname})")
    if hub_file is not None:
        return hub_file
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            p = p / fname
        if not p.is_file():
            src = "--inception-weights" if weights is not None else f"${INCEPTION_ENV}"
            raise WeightsMissingError(f"Inception weights not found at {p} (from {src}): point it to {fname}")
        return p
    candidates = [d / fname for d in _default_cache_dirs()]
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsMissingError(
        f"Inception weights '{fname}' for mode '{mode}' not found offline; put the file in one of "
        f"{', '.join(str(c.parent) for c in candidates)}, or set ${INCEPTION_ENV} / pass --inception-weights PATH"
    )


class InceptionExtractor:
    """clean-fid's Inception-v3 (pool3, 2048-d) for one of the modes ``clean | legacy_tensorflow |
    legacy_pytorch``, built from local weights only. Call with images in [0, 255] ``[B, 3, H, W]``
    already passed through :meth:`preprocess` (clean: PIL bicubic to 299²; legacy_pytorch: torch bilinear
    to 299²; legacy_tensorflow: no outside resize, the network resizes like TF)."""

    def __init__(self, path: Path, mode: str, device: Union[str, torch.device]):
        from cleanfid.resize import build_resizer

        self.mode = mode
        self.device = torch.device(device)
        self.weights_path = str(path)
        self.name = f"clean-fid inception_v3 ({mode})"
        self.preprocess = build_resizer(mode)
        self._fc: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        if mode == "legacy_pytorch":
            self._build_pytorch(path)
        else:
            self._build_torchscript(path)

    def _build_torchscript(self, path: Path) -> None:
        try:
            with warnings.catch_warnings():  # torch's deprecation notice for torch.jit.load is not the user's concern
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load")
                base = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - corrupt/wrong file is a user error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = re.split(r"(?<=\w)\. ", first)[0].rstrip(".")  # torch's first sentence, not its advice
            raise WeightsMissingError(f"cannot load TorchScript Inception from {path}: {first[:160]}") from None
        self._base = base.to(self.device)
        self._layers = self._base.layers
        out = getattr(self._base, "output", None)
        if out is not None and hasattr(out, "weight"):
            # Inception Score as in the StyleGAN/ADM ports: softmax of the output layer without its bias.
            self._fc = (out.weight.detach().to(self.device), None)

    def _build_pytorch(self, path: Path) -> None:
        import cleanfid.inception_pytorch as ip

        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise WeightsMissingError(f"cannot load Inception weights from {path}: {exc}".splitlines()[0]) from None
        orig = ip.load_state_dict_from_url
        ip.load_state_dict_from_url = lambda *a, **k: sd  # never reach the network
        try:
            model = ip.InceptionV3(output_blocks=[3], resize_input=False)
        finally:
            ip.load_state_dict_from_url = orig
        self._model = model.eval().to(self.device)
        if "fc.weight" in sd:
            self._fc = (sd["fc.weight"].float().to(self.device), sd.get("fc.bias", None))
            if self._fc[1] is not None:
                self._fc = (self._fc[0], self._fc[1].float().to(self.device))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device).float()
        b = x.shape[0]
        if self.mode == "legacy_pytorch":
            feats = self._model(x / 255.0)[0].reshape(b, 2048)
        elif self.mode == "legacy_tensorflow":
            feats = self._base(x, return_features=True).reshape(b, 2048)
        else:
            if x.shape[-2:] != (299, 299):
                raise ValueError("clean mode expects 299x299 inputs (run .preprocess first)")
            feats = self._layers.forward((x - 128.0) / 128.0).reshape(b, 2048)
        return feats.float().cpu()

    @torch.no_grad()
    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Pool features ``[B, 2048]`` -> class probabilities ``[B, 1008]`` (for the Inception Score)."""
        if self._fc is None:
            raise NotImplementedError("this Inception file has no classifier layer")
        w, bias = self._fc
        logits = F.linear(features.to(w.device).float(), w, bias)
        return logits.softmax(-1).cpu()


def inception_extractor(
    weights: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cpu",
    mode: str = "clean",
) -> InceptionExtractor:
    """clean-fid's Inception feature extractor loaded offline (see :func:`resolve_inception_weights`).

    Raises:
        WeightsMissingError: the weights file is not present locally (the message says where to put it).
    """
    path = resolve_inception_weights(weights, mode)
    return InceptionExtractor(path, mode, device)


def extractor_name(extractor: Any) -> str:
    """Human-readable name of a feature extractor (for reports)."""
    return str(getattr(extractor, "name", type(extractor).__name__))


def extractor_input(images_u8: torch.Tensor, extractor: Any) -> torch.Tensor:
    """uint8 images ``[B, 3, H, W]`` -> float ``[B, 3, h, w]`` in [0, 255], through the extractor's optional
    per-image ``preprocess`` (``[H, W, 3]`` uint8 -> ``[h, w, 3]``; clean-fid's resizer for Inception)."""
    preprocess = getattr(extractor, "preprocess", None)
    if preprocess is None:
        return images_u8.float()
    out = [torch.from_numpy(np.ascontiguousarray(preprocess(im.permute(1, 2, 0).cpu().numpy()))).permute(2, 0, 1)
           for im in images_u8]
    return torch.stack(out).float()


def run_extractor(extractor: Any, images: torch.Tensor) -> torch.Tensor:
    """Features ``[B, F]`` (float32, CPU) of images ``[B, 3, h, w]`` already through :func:`extractor_input`
    (the extractor may return a tensor or an array, of any trailing shape)."""
    f = extractor(images)
    f = f.detach().float().cpu() if isinstance(f, torch.Tensor) else torch.as_tensor(np.asarray(f)).float()
    return f.reshape(images.shape[0], -1)


def image_features(extractor: Any, images_u8: torch.Tensor) -> torch.Tensor:
    """Features ``[B, F]`` (float32, CPU) of uint8 images ``[B, 3, H, W]`` (:func:`to_uint8` output)."""
    return run_extractor(extractor, extractor_input(images_u8, extractor))


def class_probs(extractor: Any, features: torch.Tensor) -> Optional[np.ndarray]:
    """Class probabilities ``[B, C]`` (float64) from the extractor's optional ``classify``; None when it has
    none or its weights lack the classifier layer (NotImplementedError)."""
    classify = getattr(extractor, "classify", None)
    if classify is None:
        return None
    try:
        return np.asarray(torch.as_tensor(classify(features)).float().cpu().numpy(), dtype=np.float64)
    except NotImplementedError:
        return None


__all__ = [
    "PSNR_CAP_DB",
    "FID_MODES",
    "psnr",
    "ssim",
    "to_uint8",
    "to_uint8_hwc",
    "from_uint8",
    "count_parameters",
    "usage_perplexity",
    "codebook_stats",
    "code_histogram",
    "codebook_usage_metrics",
    "feature_stats",
    "frechet_distance",
    "fid_from_features",
    "kernel_inception_distance",
    "inception_score",
    "FeatureExtractor",
    "TorchFeatureExtractor",
    "InceptionExtractor",
    "inception_extractor",
    "resolve_inception_weights",
    "extractor_name",
    "extractor_input",
    "run_extractor",
    "image_features",
    "class_probs",
]
