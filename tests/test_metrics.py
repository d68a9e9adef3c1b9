"""Tests for xqtool.metrics and the LPIPS module (CPU, tiny, offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from xqtool.errors import WeightsMissingError
from xqtool.metrics import (
    PSNR_CAP_DB,
    TorchFeatureExtractor,
    codebook_stats,
    fid_from_features,
    frechet_distance,
    inception_extractor,
    inception_score,
    kernel_inception_distance,
    psnr,
    ssim,
)


def _photos(n: int = 4, size: int = 48) -> torch.Tensor:
    """n real crops of skimage's astronaut, as [n, 3, size, size] in [-1, 1]."""
    img = data.astronaut()
    crops = [img[40 * i : 40 * i + size, 60 * i : 60 * i + size] for i in range(n)]
    t = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def test_psnr_matches_skimage_and_caps_identical():
    a = _photos()
    b = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    got = psnr(a, b)
    assert got.shape == (4,)
    for i in range(4):
        ref = peak_signal_noise_ratio(((a[i] + 1) / 2).numpy(), ((b[i] + 1) / 2).numpy(), data_range=1.0)
        assert got[i].item() == pytest.approx(ref, rel=1e-6)
    same = psnr(a, a)
    assert torch.all(same == PSNR_CAP_DB)


def test_ssim_matches_skimage_and_is_one_on_identical():
    a = _photos()
    b = (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)
    got = ssim(a, b)
    for i in range(4):
        ref = structural_similarity(
            ((a[i] + 1) / 2).double().numpy(),
            ((b[i] + 1) / 2).double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        assert got[i].item() == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(ssim(a, a), torch.ones(4, dtype=torch.float64))
    assert (got < 0.99).all()


def test_codebook_stats():
    s = codebook_stats(torch.arange(8).repeat(3), 16)
    assert s["usage"] == pytest.approx(0.5)
    assert s["perplexity"] == pytest.approx(8.0)
    s1 = codebook_stats(np.zeros((2, 3, 5), dtype=np.int64), 16)
    assert s1 == {"usage": pytest.approx(1 / 16), "perplexity": pytest.approx(1.0)}
    with pytest.raises(ValueError):
        codebook_stats(torch.tensor([16]), 16)


def test_frechet_distance_closed_form():
    # 1-D Gaussians: (m1-m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    d = frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]]))
    assert d == pytest.approx(9 + 4 + 1 - 2 * 2)
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(200, 8))
    f2 = rng.normal(loc=2.0, size=(200, 8))
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(f1, f2) > 20.0
    assert kernel_inception_distance(f1, f2, num_subsets=5, max_subset_size=50) > kernel_inception_distance(
        f1, f1[::-1], num_subsets=5, max_subset_size=50
    )


def test_inception_score_bounds():
    uniform = np.full((20, 5), 0.2)
    assert inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
    onehot = np.eye(5)[np.arange(20) % 5]
    assert inception_score(onehot, splits=1)[0] == pytest.approx(5.0, rel=1e-6)


def test_torch_feature_extractor_shapes():
    ext = TorchFeatureExtractor(lambda x: x.mean(dim=(2, 3)), name="mean-rgb")
    out = ext(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_inception_extractor_missing_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("XQTOOL_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(WeightsMissingError) as ei:
        inception_extractor(weights=tmp_path / "nope.pt")
    assert "nope.pt" in str(ei.value) and "\n" not in str(ei.value)
    monkeypatch.setenv("XQTOOL_INCEPTION_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsMissingError, match="inception-2015-12-05.pt"):
        inception_extractor()
