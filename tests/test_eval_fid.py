"""Tests for xqtool.tasks.eval_fid and `xqtool eval-fid` / `make-fid-stats` (CPU, offline, injected extractors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from xqtool.cli import app
from xqtool.metrics import PSNR_CAP_DB, TorchFeatureExtractor
from xqtool.tasks.eval_fid import (FidSettings, FidStatsSettings, RfidSettings, evaluate_fid, evaluate_rfid,
                                     make_fid_stats)
from xqtool.tasks.injected import Injected

runner = CliRunner()


def _crops(img: np.ndarray, n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random size×size crops (uint8 [n, size, size, 3]) of a real photo."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = rng.integers(0, img.shape[0] - size)
        l = rng.integers(0, img.shape[1] - size)
        c = img[t : t + size, l : l + size]
        out.append(c[:, ::-1] if rng.random() < 0.5 else c)
    return np.ascontiguousarray(np.stack(out))


@pytest.fixture(scope="module")
def sets():
    a = np.concatenate([_crops(data.astronaut(), 24, seed=1), _crops(data.coffee(), 24, seed=2)])
    cam = np.repeat(data.camera()[:, :, None], 3, axis=2)
    b = np.concatenate([_crops(cam, 24, seed=3), _crops(255 - data.chelsea(), 24, seed=4)])
    return a, b


def _extractor(with_classify: bool = True) -> TorchFeatureExtractor:
    """Small deterministic features: per-channel mean/std + 3x3 pooled gray (15 dims) and a 5-way 'classifier'."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        gray = x.mean(1, keepdim=True)
        pooled = F.adaptive_avg_pool2d(gray, 3).flatten(1)
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), pooled], 1)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 15, generator=g)
    classify = (lambda f: (f @ w.T * 4).softmax(-1)) if with_classify else None
    return TorchFeatureExtractor(fn, name="toy-stats", classify=classify)


def _write_folder(path, arr):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(path / f"{i:04d}.png")
    return path


def test_fid_self_zero_and_different_large(tmp_path, sets):
    a, b = sets
    ext = _extractor()
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    fx = Injected(feature_extractor=ext)
    same = evaluate_fid(FidSettings(gen=tmp_path / "a.npz", ref=tmp_path / "a.npz", report_path=None), fx)
    diff = evaluate_fid(FidSettings(gen=tmp_path / "b.npz", ref=tmp_path / "a.npz", report_path=None), fx)
    assert same["metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert diff["metrics"]["fid"] > 0.1
    assert diff["metrics"]["kid"] > same["metrics"]["kid"]
    assert 1.0 <= diff["metrics"]["inception_score"] <= 5.0


def test_folder_npz_and_stats_inputs_agree(tmp_path, sets):
    a, b = sets
    ext = _extractor()
    folder = _write_folder(tmp_path / "ref_png", a)
    np.savez(tmp_path / "ref.npz", arr_0=a)
    _write_folder(tmp_path / "gen_png", b)
    fx = Injected(feature_extractor=ext)
    by_folder = evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref=folder, report_path=None), fx)
    by_npz = evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref=tmp_path / "ref.npz", report_path=None), fx)
    summary = make_fid_stats(FidStatsSettings(source=folder, name="toyref", stats_dir=tmp_path / "stats"), fx)
    assert summary["count"] == len(a)
    by_name = evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref_stats="toyref", stats_dir=tmp_path / "stats",
                                       report_path=None), fx)
    # a plain mu/sigma stats file (ADM reference batch layout: images + mu + sigma)
    from xqtool.tasks.eval_fid import load_feature_set

    fs = load_feature_set(folder, ext)
    np.savez(tmp_path / "adm_ref.npz", arr_0=a, mu=fs.mu, sigma=fs.sigma)
    np.savez(tmp_path / "mu_sigma.npz", mu=fs.mu, sigma=fs.sigma)
    by_adm_images = evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref=tmp_path / "adm_ref.npz",
                                             report_path=None), fx)
    by_adm_stats = evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref=tmp_path / "adm_ref.npz",
                                            use_npz_stats=True, report_path=None), fx)
    by_stats = evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref=tmp_path / "mu_sigma.npz", report_path=None), fx)
    ref_fid = by_folder["metrics"]["fid"]
    assert ref_fid > 0.1
    for r in (by_npz, by_name, by_adm_images, by_adm_stats, by_stats):
        assert r["metrics"]["fid"] == pytest.approx(ref_fid, rel=1e-5)
    assert by_name["metrics"]["kid"] == pytest.approx(by_folder["metrics"]["kid"], rel=1e-4)
    assert by_stats["metrics"]["kid"] is None and by_stats["ref"]["kind"] == "stats"
    assert by_adm_images["ref"]["kind"] == "npz-images" and by_adm_stats["ref"]["kind"] == "stats"
    # stats of an unknown name / a mismatched extractor are user errors
    from xqtool.errors import ConfigError, DataError

    with pytest.raises(DataError, match="make-fid-stats"):
        evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref_stats="nope", stats_dir=tmp_path / "stats"), fx)
    other = TorchFeatureExtractor(ext.fn, name="other")
    with pytest.raises(ConfigError, match="toy-stats"):
        evaluate_fid(FidSettings(gen=tmp_path / "gen_png", ref_stats="toyref", stats_dir=tmp_path / "stats"),
                     Injected(feature_extractor=other))
    with pytest.raises(DataError, match="already exist"):
        make_fid_stats(FidStatsSettings(source=folder, name="toyref", stats_dir=tmp_path / "stats"), fx)


def test_report_holds_every_field(tmp_path, sets):
    a, b = sets
    np.savez(tmp_path / "a.npz", arr_0=a)
    _write_folder(tmp_path / "b", b[:20])
    rp = tmp_path / "out" / "fid.json"
    evaluate_fid(FidSettings(gen=tmp_path / "b", ref=tmp_path / "a.npz", report_path=rp, max_images=16, image_size=24),
                 Injected(feature_extractor=_extractor()))
    rep = json.loads(rp.read_text())
    assert set(rep["metrics"]) >= {"fid", "kid", "inception_score", "inception_score_std"}
    assert rep["backend"]["library"].startswith("clean-fid") and rep["backend"]["feature_extractor"] == "toy-stats"
    assert rep["backend"]["mode"] == "clean" and rep["backend"]["injected_extractor"] is True
    assert rep["image_counts"] == {"gen": 16, "ref": 16}
    assert rep["resolution"]["gen"] == ["24x24"] and rep["resolution"]["center_crop"] == 24
    assert "center crop 24x24" in rep["preprocessing"]
    assert rep["gen"]["path"].endswith("/b") and rep["ref"]["path"].endswith("a.npz")
    assert rep["xqtool_version"] and rep["created"] and rep["notes"]


class _PerfectTokenizer(nn.Module):
    """A stand-in whose decode returns exactly what was encoded (a perfect reconstruction)."""

    image_size = 32
    codebook_size = 4
    config = None

    def encode(self, x):
        self._last = x.clone()
        return torch.zeros(x.shape[0], 1, 3, dtype=torch.long)

    def decode(self, tokens):
        return self._last


def test_rfid_of_perfect_reconstruction(tmp_path, sets):
    a, _ = sets
    _write_folder(tmp_path / "data", a)
    rep = evaluate_rfid(RfidSettings(tokenizer=None, data=tmp_path / "data", batch_size=16,
                                     report_path=tmp_path / "r.json", max_images=40),
                        Injected(tokenizer=_PerfectTokenizer(), feature_extractor=_extractor(),
                                 lpips=lambda x, y: (x - y).abs().mean((1, 2, 3))))
    m = rep["metrics"]
    assert m["rfid"] == pytest.approx(0.0, abs=1e-6)
    assert m["psnr"] == PSNR_CAP_DB and m["ssim"] == pytest.approx(1.0)
    assert m["lpips"] == pytest.approx(0.0)
    assert m["codebook_usage"] == [0.25]
    assert rep["image_counts"]["originals"] == 40
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["psnr"] == PSNR_CAP_DB


def _tiny_cnn_checkpoint(tmp_path):
    pytest.importorskip("xqtool.models.tokenizer")
    from xqtool.checkpoints import save_tokenizer
    from xqtool.config import load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_tokenizer_config("configs/tokenizer/tiny-cnn.yaml", overrides=["model.ch=16"])
    tok = build_tokenizer(cfg)
    save_tokenizer(tmp_path / "tok", tok)
    return tmp_path / "tok", tok


def _fake_torchscript_inception(path):
    """A tiny TorchScript module with clean-fid's Inception interface (layers → 2048 features, output head)."""

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(8))
            self.output = nn.Linear(2048, 10)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            f = self.layers((x - 128.0) / 128.0).reshape(x.shape[0], 2048)
            if return_features:
                return f
            return self.output(f).softmax(-1)

    torch.manual_seed(0)
    torch.jit.script(Fake()).save(str(path))
    return path


def test_cli_rfid_real_tokenizer_and_fake_inception_file(tmp_path, sets, monkeypatch):
    ckpt, tok = _tiny_cnn_checkpoint(tmp_path)
    a, _ = sets
    _write_folder(tmp_path / "data", a[:12])
    weights = _fake_torchscript_inception(tmp_path / "inception-2015-12-05.pt")
    monkeypatch.setenv("XQTOOL_INCEPTION_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no LPIPS weights -> skipped (auto)
    monkeypatch.delenv("XQTOOL_LPIPS_WEIGHTS", raising=False)
    rp = tmp_path / "rfid.json"
    res = runner.invoke(app, ["eval-fid", "--rfid", "-t", str(ckpt), str(tmp_path / "data"), "--max-images", "10",
                              "--batch-size", "4", "-o", str(rp), "--save-recon", str(tmp_path / "recon")])
    assert res.exit_code == 0, res.output
    assert "rfid" in res.output and "psnr" in res.output
    rep = json.loads(rp.read_text())
    assert rep["config_hash"] == tok.config_hash() and rep["checkpoint"] == str(ckpt.resolve())
    assert rep["backend"]["weights"] == str(weights) and rep["backend"]["mode"] == "clean"
    assert rep["image_counts"]["originals"] == 10 and len(list((tmp_path / "recon").glob("*.png"))) == 10
    m = rep["metrics"]
    assert m["rfid"] > 0 and 0 < m["psnr"] < PSNR_CAP_DB and m["ssim"] < 1 and m["lpips"] is None
    assert m["inception_score"] is not None and len(m["codebook_usage"]) == 2
    assert rep["resolution"]["image_size"] == 32


def test_cli_fid_make_stats_alias_and_errors(tmp_path, sets, monkeypatch):
    a, b = sets
    _write_folder(tmp_path / "a", a[:10])
    _write_folder(tmp_path / "b", b[:10])
    _fake_torchscript_inception(tmp_path / "inception-2015-12-05.pt")
    monkeypatch.setenv("XQTOOL_INCEPTION_WEIGHTS", str(tmp_path / "inception-2015-12-05.pt"))
    res = runner.invoke(app, ["eval-fid", "make-stats", str(tmp_path / "a"), "--name", "tiny",
                              "--stats-dir", str(tmp_path / "st"), "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "st" / "tiny_clean_custom_na.npz").is_file()
    assert (tmp_path / "st" / "tiny_clean_custom_na_kid.npz").is_file()
    rp = tmp_path / "fid.json"
    res = runner.invoke(app, ["eval-fid", str(tmp_path / "b"), "--ref-stats", "tiny", "--stats-dir",
                              str(tmp_path / "st"), "-o", str(rp)])
    assert res.exit_code == 0, res.output
    via_stats = json.loads(rp.read_text())["metrics"]["fid"]
    res = runner.invoke(app, ["eval-fid", str(tmp_path / "b"), str(tmp_path / "a"), "-o", str(rp)])
    assert res.exit_code == 2 and "--overwrite" in res.output  # never replaced without asking
    res = runner.invoke(app, ["eval-fid", str(tmp_path / "b"), str(tmp_path / "a"), "-o", str(rp), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads(rp.read_text())["metrics"]["fid"] == pytest.approx(via_stats, rel=1e-4)
    res = runner.invoke(app, ["make-fid-stats", str(tmp_path / "a"), "--name", "tiny", "--stats-dir",
                              str(tmp_path / "st")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    # missing weights: one line, exit 2, says where to put them
    monkeypatch.setenv("XQTOOL_INCEPTION_WEIGHTS", str(tmp_path / "missing"))
    res = runner.invoke(app, ["eval-fid", str(tmp_path / "b"), str(tmp_path / "a")])
    assert res.exit_code == 2 and "Inception weights" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval-fid", str(tmp_path / "b"), "--mode", "nope"])
    assert res.exit_code == 2


def test_cli_missing_inputs_are_named_before_any_weights_are_looked_for(tmp_path, monkeypatch):
    """A typo in the data path is the error, not the (also missing) Inception weights that would be loaded first."""
    monkeypatch.delenv("XQTOOL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    missing = tmp_path / "nope"
    for args in (["eval-fid", "--rfid", "-t", str(tmp_path / "any-tokenizer"), str(missing)],
                 ["eval-fid", str(missing), str(tmp_path / "nope2")]):
        res = runner.invoke(app, [*args, "-o", str(tmp_path / "r.json")])
        assert res.exit_code == 2, res.output
        assert "not found" in res.output and str(missing) in res.output and "Inception" not in res.output


def test_inception_search_skips_world_writable_tmp_and_hides_torch_notices(tmp_path, monkeypatch):
    """clean-fid's /tmp download is not loaded implicitly (a TorchScript file is code); a broken file gives torch's
    first sentence, without its deprecation warning."""
    import warnings

    from xqtool.errors import WeightsMissingError
    from xqtool.metrics import InceptionExtractor, resolve_inception_weights

    monkeypatch.delenv("XQTOOL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(WeightsMissingError) as err:
        resolve_inception_weights(None, "clean")
    assert "/tmp," not in str(err.value) and "/tmp " not in str(err.value)
    broken = tmp_path / "inception-2015-12-05.pt"
    broken.write_bytes(b"not a zip archive at all")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(WeightsMissingError) as err:
            InceptionExtractor(broken, "clean", "cpu")
    assert not [w for w in seen if "jit" in str(w.message)]
    assert str(err.value).startswith(f"cannot load TorchScript Inception from {broken}: ")
    assert "If you are seeing this error" not in str(err.value)
