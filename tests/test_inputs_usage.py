"""codebook_usage: one definition (exact distinct codes over the evaluated set, per branch and per scale),
the same numbers from train-tokenizer validation and `eval-fid --rfid` on the same weights and images, and
both equal to a numpy count of the tokens. Plus the eval-fid warning for stats at another resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xqtool.config import load_tokenizer_config
from xqtool.data.images import open_image_source
from xqtool.metrics import TorchFeatureExtractor, code_histogram, codebook_usage_metrics
from xqtool.tasks.eval_fid import RfidSettings, evaluate_rfid
from xqtool.tasks.injected import Injected
from xqtool.data.samples import sample_photo_folder
from xqtool.training import TokenizerRunOptions, TokenizerTrainer, TrainInjected

ROOT = Path(__file__).resolve().parents[1]
N_VAL = 6


def _fx() -> TorchFeatureExtractor:
    return TorchFeatureExtractor(lambda x: torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1), name="tiny")


def _numpy_usage(tokens: np.ndarray, K: int, scales) -> dict:
    """Independent reference: np.unique over each branch (all scales) and each (branch, scale)."""
    P = tokens.shape[1]
    bounds = np.cumsum([0] + [p * p for p in scales])
    used = [len(np.unique(tokens[:, b])) for b in range(P)]
    per_scale = [[len(np.unique(tokens[:, b, bounds[s]:bounds[s + 1]])) for s in range(len(scales))] for b in range(P)]
    return {"codes_used": used, "codes_used_per_scale": per_scale,
            "codebook_usage": [u / K for u in used],
            "codebook_usage_per_scale": [[u / K for u in row] for row in per_scale]}


def test_histogram_metrics_match_numpy():
    rng = np.random.default_rng(0)
    scales, K = (1, 2, 3), 7
    toks = rng.integers(0, K, (5, 2, sum(p * p for p in scales)))
    toks[:, 1] = np.minimum(toks[:, 1], 2)  # branch 1 uses only codes 0..2
    got = codebook_usage_metrics(code_histogram(torch.from_numpy(toks), K, scales))
    want = _numpy_usage(toks, K, scales)
    for key, value in want.items():
        assert got[key] == value, key
    assert got["codes_used"][1] == 3
    counts = np.bincount(toks[:, 0].ravel(), minlength=K) / toks[:, 0].size
    nz = counts[counts > 0]
    assert got["codebook_perplexity"][0] == pytest.approx(float(np.exp(-(nz * np.log(nz)).sum())))


def test_train_validation_and_rfid_report_the_same_usage(tmp_path):
    photos = tmp_path / "photos"
    sample_photo_folder(photos, 32)
    cfg = load_tokenizer_config(
        ROOT / "configs" / "tokenizer" / "tiny-vit.yaml",
        overrides=["model.vit_embed_dim=16", "quant.codebook_size=16", "quant.codebook_embed_dim=4",
                   "train.global_batch_size=4", "train.tracker=none", "loss.disc_type=none",
                   f"data.max_val_images={N_VAL}", f"data.data_path={photos / 'train'}",
                   f"data.val_data_path={photos / 'val'}"],
    )
    torch.manual_seed(0)
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=1, progress=False),
                               TrainInjected(feature_extractor=_fx(), allow_random_weights=True))
    val = trainer.validate(0)
    model = (trainer.ema.module if trainer.ema is not None else trainer.unwrapped).eval()
    rep = evaluate_rfid(RfidSettings(tokenizer=None, data=photos / "val", lpips="off", batch_size=4, max_images=N_VAL,
                                     kid=False, report_path=tmp_path / "r.json"),
                        Injected(tokenizer=model, feature_extractor=_fx()))
    m = rep["metrics"]
    # independent reference: the same images, encoded here, counted with numpy
    images = torch.stack([s["image"] for s in open_image_source(photos / "val", image_size=32)][:N_VAL])
    with torch.no_grad():
        toks = model.encode(images).numpy()
    want = _numpy_usage(toks, cfg.quant.codebook_size, cfg.quant.v_patch_nums)
    P, S = toks.shape[1], len(cfg.quant.v_patch_nums)
    assert m["codebook_usage"] == want["codebook_usage"]
    assert m["codebook_usage_per_scale"] == want["codebook_usage_per_scale"]
    assert m["codes_used"] == want["codes_used"]
    for b in range(P):
        assert val[f"val/codebook_usage/b{b}"] == want["codebook_usage"][b]
        for s in range(S):
            assert val[f"val/codebook_usage/b{b}/s{s}"] == want["codebook_usage_per_scale"][b][s]
    assert "val/codebook_usage" not in val  # the old mean-over-scales number is gone


def _stats_extractor() -> TorchFeatureExtractor:
    return TorchFeatureExtractor(lambda x: torch.cat([(x / 255.0).mean((2, 3)), (x / 255.0).std((2, 3))], 1),
                                 name="toy-stats")


def test_eval_fid_warns_when_custom_stats_have_another_resolution(tmp_path, caplog):
    from PIL import Image

    from xqtool.tasks.eval_fid import FidSettings, FidStatsSettings, evaluate_fid, make_fid_stats
    from xqtool.tasks.injected import Injected

    rng = np.random.default_rng(0)
    for name, side in (("ref64", 64), ("gen32", 32), ("gen64", 64)):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    ext = _stats_extractor()
    fx = Injected(feature_extractor=ext)
    make_fid_stats(FidStatsSettings(source=tmp_path / "ref64", name="r64", stats_dir=tmp_path / "stats"), fx)
    with caplog.at_level("WARNING", logger="xqtool.tasks.eval_fid"):
        rep = evaluate_fid(FidSettings(gen=tmp_path / "gen32", ref_stats="r64", stats_dir=tmp_path / "stats",
                                       kid=False, inception_score=False, report_path=None), fx)
    lines = [r.getMessage() for r in caplog.records if "resolution" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "32x32" in lines[0] and "64x64" in lines[0] and "'r64'" in lines[0]
    assert any("resolution mismatch" in n for n in rep["notes"])
    assert rep["resolution"]["gen"] == ["32x32"] and rep["resolution"]["ref"] == ["64x64"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="xqtool.tasks.eval_fid"):
        rep = evaluate_fid(FidSettings(gen=tmp_path / "gen64", ref_stats="r64", stats_dir=tmp_path / "stats",
                                       kid=False, inception_score=False, report_path=None), fx)
    assert not [r for r in caplog.records if "resolution" in r.getMessage()]
    assert not any("resolution mismatch" in n for n in rep["notes"])
