"""Tests for xqtool.metrics and the LPIPS module (CPU, tiny, offline)."""

from __future__ import annotations


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


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


def test_lpips_missing_weights_raises(tmp_path, monkeypatch):
    from xqtool.losses.lpips import LPIPS

    monkeypatch.delenv("XQTOOL_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(WeightsMissingError, match="XQTOOL_LPIPS_WEIGHTS"):
        LPIPS()
    with pytest.raises(WeightsMissingError, match="nothere"):
        LPIPS(weights=tmp_path / "nothere.pth")


def test_lpips_loads_official_head_keys_and_full_state(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from xqtool.losses.lpips import CHANNELS, LPIPS

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    ref = LPIPS(allow_random=True)
    # full module written in official taming/LPIPS key style: net.sliceK.i.* + lin{k}.model.1.weight
    sd = {}
    slice_of = lambda i: 1 + sum(i > e for e in (3, 8, 15, 22))  # noqa: E731
    for k, v in ref.state_dict().items():
        if k.startswith("features."):
            _, i, name = k.split(".")
            sd[f"net.slice{slice_of(int(i))}.{i}.{name}"] = v.clone()
        else:
            sd[k] = v.clone()
    assert {f"lin{i}.model.1.weight" for i in range(5)} <= set(sd)
    assert sd["lin4.model.1.weight"].shape == (1, CHANNELS[4], 1, 1)
    path = tmp_path / "lpips_full.pth"
    torch.save(sd, path)
    loaded = LPIPS(weights=path)
    x = _photos(2, 32)
    y = x.flip(-1)
    assert torch.allclose(loaded(x, y), ref(x, y), atol=1e-6)
    # also via env var and a safetensors file
    st = tmp_path / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    monkeypatch.setenv("XQTOOL_LPIPS_WEIGHTS", str(st))
    assert torch.allclose(LPIPS()(x, y), ref(x, y), atol=1e-6)
    # heads only (official vgg.pth layout) without a VGG16 backbone -> clear error
    heads = tmp_path / "vgg.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, heads)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    monkeypatch.delenv("XQTOOL_VGG16_WEIGHTS", raising=False)
    with pytest.raises(WeightsMissingError, match="vgg16-397923af.pth"):
        LPIPS(weights=heads)


def test_lpips_behaviour_and_gradients(tmp_path, monkeypatch):
    from xqtool.losses.lpips import LPIPS

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    net = LPIPS(allow_random=True)
    net.train()
    assert not net.training
    x = _photos(2, 32).requires_grad_(True)
    d_same = net(x, x.detach())
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    y = (x.detach() + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = net(x, y)
    assert (d > 0).all()
    d.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_low_rank_fid_path_matches_matrix_sqrt():
    from xqtool.metrics import feature_stats

    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(20, 64))
    f2 = rng.normal(loc=0.3, scale=1.5, size=(30, 64))
    fast = fid_from_features(f1, f2)  # N < F: low-rank identity
    slow = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert fast == pytest.approx(slow, rel=1e-6)
