"""Tests for xqtool.tasks.probe and `xqtool probe` (tiny CNN tokenizer, synthetic colour classes, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from xqtool.cli import app
from xqtool.errors import ConfigError, DataError
from xqtool.tasks.injected import Injected
from xqtool.tasks.probe import ProbeOptim, ProbeSettings, probe_features, run_probe

runner = CliRunner()

TINTS = {"0_reddish": (1.0, 0.35, 0.35), "1_blueish": (0.35, 0.35, 1.0)}


def _colour_tree(root, n_per_class: int, seed: int):
    """Class-tree folder: real photo crops (32 px) tinted red or blue; the class is the colour."""
    rng = np.random.default_rng(seed)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for cls, tint in TINTS.items():
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n_per_class):
            img = photos[rng.integers(len(photos))]
            t, l = rng.integers(0, img.shape[0] - 64), rng.integers(0, img.shape[1] - 64)
            crop = img[t : t + 64, l : l + 64].astype(np.float64)
            gray = crop.mean(2, keepdims=True)
            tinted = np.clip(gray * np.array(tint) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
            Image.fromarray(tinted).resize((32, 32), Image.BICUBIC).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tok():
    from xqtool.config import load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_tokenizer_config("configs/tokenizer/tiny-cnn.yaml", overrides=["model.ch=16"])
    return build_tokenizer(cfg).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return _colour_tree(root / "train", 24, seed=0), _colour_tree(root / "val", 30, seed=1)


FAST = ProbeOptim(epochs=30, batch_size=16, lr=5e-2, weight_decay=1e-4, warmup_epochs=1, warmup_lr=5e-3,
                  milestones=(0.6, 0.9))


def test_feature_shapes(tok):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    D, P = tok.embed_dim, tok.num_branches
    assert probe_features(tok, x, "semantic").shape == (2, D)
    assert probe_features(tok, x, "all").shape == (2, P * D)
    assert probe_features(tok, x, "quantized").shape == (2, D)
    with pytest.raises(ConfigError):
        probe_features(tok, x, "pixels")


def test_probe_learns_colour_and_saves_best(tok, dataset, tmp_path):
    train, val = dataset
    seen = []
    rep = run_probe(ProbeSettings(train=train, val=val, features="all", optim=FAST, out_dir=tmp_path / "p"),
                    Injected(tokenizer=tok, on_epoch=seen.append))
    assert rep["best_top1"] >= 0.9, rep["history"]
    assert rep["num_classes"] == 2 and rep["image_counts"] == {"train": 48, "val": 60, "skipped_bad_files": 0}
    assert len(rep["history"]) == 30 and len(seen) == 30
    assert {"epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5"} <= set(rep["history"][0])
    assert rep["history"][0]["val_top5"] == 1.0  # top-5 of 2 classes
    # one warmup epoch, then x0.1 at 60 % and 90 % of 30 epochs (epochs 18 and 27, 0-based 17 and 26)
    lrs = [h["lr"] for h in rep["history"]]
    assert lrs[0] == pytest.approx(FAST.warmup_lr) and lrs[1] == pytest.approx(FAST.lr)
    assert lrs[17] == pytest.approx(FAST.lr) and lrs[18] == pytest.approx(FAST.lr * 0.1)
    assert lrs[-1] == pytest.approx(FAST.lr * 0.01)
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "p" / "best.safetensors"))
    assert best["head.weight"].shape == (2, 2 * tok.embed_dim) and "norm.running_mean" in best
    saved = json.loads((tmp_path / "p" / "probe_report.json").read_text())
    assert saved["best_top1"] == rep["best_top1"] and saved["features"] == "all"


def test_probe_on_shuffled_labels_stays_near_chance(tok, dataset, tmp_path):
    train, val = dataset
    rep = run_probe(ProbeSettings(train=train, val=val, features="all", optim=FAST, out_dir=None,
                                  shuffle_labels=True), Injected(tokenizer=tok))
    assert rep["final_top1"] <= 0.75, rep["history"]
    assert rep["best_top1"] < 0.9


def test_probe_uncached_and_errors(tok, dataset, tmp_path):
    train, val = dataset
    s = ProbeOptim(epochs=2, batch_size=16, lr=1e-2)
    fx = Injected(tokenizer=tok)
    rep = run_probe(ProbeSettings(train=train, val=val, optim=s, cache_features=False, num_classes=2, out_dir=None),
                    fx)
    assert len(rep["history"]) == 2 and rep["image_counts"]["train"] == 48
    with pytest.raises(ConfigError, match="num-classes"):
        run_probe(ProbeSettings(train=train, val=val, optim=s, cache_features=False, out_dir=None), fx)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((train / "0_reddish").glob("*.png"))[:4]):
        (flat / f"{i}.png").write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="class"):
        run_probe(ProbeSettings(train=flat, val=val, optim=s, out_dir=None), fx)


def test_cli_probe(tok, dataset, tmp_path):
    from xqtool.checkpoints import save_tokenizer

    save_tokenizer(tmp_path / "tok", tok)
    train, val = dataset
    res = runner.invoke(app, ["probe", "-t", str(tmp_path / "tok"), "--train", str(train), "--val", str(val),
                              "--epochs", "3", "--batch-size", "16", "--lr", "1e-2", "--features", "semantic",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "best val top-1" in res.output
    rep = json.loads((tmp_path / "out" / "probe_report.json").read_text())
    assert rep["checkpoint"] == str((tmp_path / "tok").resolve()) and rep["config_hash"] == tok.config_hash()
    assert (tmp_path / "out" / "best.safetensors").is_file()
    # the deprecated spellings (positional tokenizer, --out) still work for one release
    res = runner.invoke(app, ["probe", str(tmp_path / "tok"), "--train", str(train), "--val", str(val),
                              "--features", "pixels", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "features" in res.output
