"""Tokenizer training loop: loss falls, outputs, GAN variants, exact resume, EMA/best, NaN patience, teachers."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import assert_same_state
from xqtool.config import load_tokenizer_config
from xqtool.errors import ConfigError, WeightsMissingError
from xqtool.metrics import TorchFeatureExtractor
from xqtool.data.samples import sample_photo_folder
from xqtool.training import TokenizerRunOptions, TokenizerTrainer, TrainInjected, train_tokenizer
from xqtool.training.schedules import warmup_cosine_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.vit_embed_dim=16", "quant.codebook_size=16", "quant.codebook_embed_dim=4",
    "train.global_batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.tracker=none",
    "loss.disc_type=none", "data.max_val_images=4",
]
TINY_DISC = {"patchgan": dict(ndf=4, n_layers=2), "stylegan": dict(base_channels=4, max_channels=8),
             "dinodisc": dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2)}


def _fx() -> TorchFeatureExtractor:
    """Tiny deterministic feature extractor for rFID (mean colour per 4x4 cell)."""
    return TorchFeatureExtractor(lambda x: torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1), name="tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "sample"
    sample_photo_folder(root, 32)
    return root


def _cfg(photos: Path, *extra: str, base: str = "tiny-vit"):
    return load_tokenizer_config(
        ROOT / "configs" / "tokenizer" / f"{base}.yaml",
        overrides=TINY + [f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}", *extra],
    )


def test_lr_schedule():
    assert warmup_cosine_factor(0, total=100, warmup=10, kind="cosine", base=1.0, min_lr=0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(10, total=100, warmup=10, kind="cosine", base=1.0, min_lr=0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(99, total=100, warmup=10, kind="cosine", base=1.0, min_lr=0.1) == pytest.approx(0.1, abs=1e-3)
    assert warmup_cosine_factor(50, total=100, warmup=0, kind="constant", base=1.0, min_lr=0.1) == 1.0


def test_loss_falls_and_outputs(photos, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(photos, "train.lr=1e-3", "train.eval_every=30", "train.ckpt_every=30", "train.tracker=tensorboard",
               "train.best_metric=rfid", "train.ema_decay=0.9", "model.vit_embed_dim=32")
    res = train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=30, progress=False),
                          TrainInjected(feature_extractor=_fx()))
    assert res.status == "finished" and res.step == 30
    rec = [h["rec_loss"] for h in res.history]
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    out = tmp_path / "run"
    for name in ("model.safetensors", "ema.safetensors", "config.yaml"):
        assert (out / "last" / name).is_file() and (out / "best" / name).is_file()
    assert list((out / "recon").glob("step-*.png"))
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert "val/rfid" in res.last_val and math.isfinite(res.last_val["val/rfid"])
    assert "val/codebook_usage/b1/s2" in res.last_val and "val/codebook_perplexity/b0/s0" in res.last_val
    # EMA differs from the raw weights and is what `best` holds (best == last here: same step)
    raw, ema = load_file(out / "best" / "model.safetensors"), load_file(out / "best" / "ema.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    last_ema = load_file(out / "last" / "ema.safetensors")
    assert all(torch.equal(ema[k], last_ema[k]) for k in ema)
    from xqtool.checkpoints import load_tokenizer

    tok = load_tokenizer(out / "best")
    assert all(torch.equal(v.cpu(), ema[k]) for k, v in tok.state_dict().items() if k in ema)


@pytest.mark.parametrize("disc_type,loss", [("patchgan", "hinge"), ("stylegan", "non_saturating"), ("dinodisc", "vanilla")])
def test_gan_step_each_discriminator(photos, tmp_path, disc_type, loss):
    torch.manual_seed(0)
    cfg = _cfg(photos, f"loss.disc_type={disc_type}", f"loss.disc_loss={loss}", f"loss.gen_loss={loss}",
               "loss.disc_start=1", "loss.lecam_loss_weight=0.001", "train.eval_every=100", "train.ckpt_every=100",
               "train.best_metric=psnr")
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=2, progress=False),
                               TrainInjected(disc_overrides=TINY_DISC[disc_type], allow_random_weights=True))
    before = [p.detach().clone() for p in trainer.disc.parameters()]
    res = trainer.run()
    h = res.history[-1]
    for key in ("generator_adv_loss", "disc_adaptive_weight", "discriminator_adv_loss", "lecam_loss"):
        assert math.isfinite(h[key]), key
    assert h["disc_adaptive_weight"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.disc.parameters()))


def _weights(d: Path):
    return load_file(d / "model.safetensors"), load_file(d / "ema.safetensors")


def test_exact_resume(photos, tmp_path):
    extra = ("loss.disc_type=patchgan", "loss.disc_start=2", "loss.lecam_loss_weight=0.01", "train.eval_every=100",
             "train.ckpt_every=100", "train.best_metric=psnr", "train.lr_scheduler=cosine", "train.warmup_steps=2",
             "train.ema_decay=0.5")
    kw = dict(max_steps=6, progress=False)
    inj = TrainInjected(disc_overrides=TINY_DISC["patchgan"])
    cfg = _cfg(photos, *extra)
    train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "straight", **kw), inj)

    def kill_at_3(tr):
        if tr.pos.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    r1 = train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "resumed", **kw),
                         TrainInjected(disc_overrides=TINY_DISC["patchgan"], callbacks=[kill_at_3]))
    assert r1.status == "interrupted" and r1.step == 3 and r1.state_dir.name == "step-0000003"
    with pytest.raises(ConfigError, match="--resume auto"):  # never clobber a run by accident
        train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "resumed", **kw), inj)
    r2 = train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "resumed", resume="auto", **kw), inj)
    assert r2.status == "finished" and r2.step == 6
    (m1, e1), (m2, e2) = _weights(tmp_path / "straight" / "last"), _weights(tmp_path / "resumed" / "last")
    assert m1.keys() == m2.keys() and e1.keys() == e2.keys() and any("ema_vocab_hit" in k for k in m1)
    for k in m1:  # no key skipped: codebook-usage buffers included
        assert torch.equal(m1[k], m2[k]), k
        assert torch.equal(e1[k], e2[k]), k
    assert_same_state(tmp_path / "straight" / "checkpoints" / "step-0000006",
                      tmp_path / "resumed" / "checkpoints" / "step-0000006")




def test_nan_patience_stops_and_keeps_last_good(photos, tmp_path):
    cfg = _cfg(photos, "train.nan_patience=2", "train.ckpt_every=1", "train.eval_every=100", "train.best_metric=psnr")
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=10, progress=False))
    real = trainer.objective.rec_loss
    trainer.objective.rec_loss = lambda x, r: real(x, r) * (float("nan") if trainer.pos.step >= 2 else 1.0)
    res = trainer.run()
    assert res.status == "diverged" and res.step == 2
    assert "nan_patience" in res.message and "step-0000002" in res.message
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()


def test_semantic_guide_without_weights_fails_before_training(photos, tmp_path, monkeypatch):
    for var in ("XQTOOL_DINOV2_WEIGHTS", "XQTOOL_CLIP_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = _cfg(photos, "loss.semantic_guide=dinov2")
    with pytest.raises(WeightsMissingError, match="semantic_weights=PATH.*XQTOOL_DINOV2_WEIGHTS"):
        train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=2, progress=False))
    assert not (tmp_path / "run" / "checkpoints").exists()
    import xqtool.cli

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text((ROOT / "configs/tokenizer/tiny-cnn.yaml").read_text())
    r = CliRunner().invoke(xqtool.cli.app, ["train-tokenizer", str(cfg_path), "--set", "loss.semantic_guide=dinov2",
                                            "-o", str(tmp_path / "cli"), "--max-steps", "1", "--no-progress"])
    assert r.exit_code == 2 and "XQTOOL_DINOV2_WEIGHTS" in r.output


def test_semantic_distillation_and_lpips_run_with_random_weights(photos, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(photos, "loss.semantic_guide=dinov2", "loss.sem_loss_weight=0.1", "train.eval_every=100",
               "train.ckpt_every=100", "train.best_metric=psnr", "quant.codebook_drop=0.5", "model.ch=8",
               "model.z_channels=8", "loss.perceptual_weight=0.5", base="tiny-cnn")
    res = train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=2, progress=False),
                          TrainInjected(allow_random_weights=True,
                                        teacher_overrides=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8)))
    assert all(math.isfinite(h["sem_loss"]) and h["sem_loss"] > 0 for h in res.history)
    assert all(math.isfinite(h["perceptual_loss"]) and h["perceptual_loss"] >= 0 for h in res.history)


def test_cli_train_tiny_vit(photos, tmp_path):
    import xqtool.cli

    r = CliRunner().invoke(xqtool.cli.app, [
        "train-tokenizer", str(ROOT / "configs/tokenizer/tiny-vit.yaml"), "-o", str(tmp_path / "vit"),
        "--max-steps", "2", "--no-progress", "--set", f"data.data_path={photos / 'train'}",
        "--set", f"data.val_data_path={photos / 'val'}", "--set", "train.global_batch_size=4",
        "--set", "train.tracker=none", "--set", "loss.disc_type=none", "--set", "model.vit_embed_dim=16",
    ])
    assert r.exit_code == 0, r.output
    assert "finished" in r.output and (tmp_path / "vit" / "last" / "model.safetensors").is_file()


def test_last_reports_its_own_step_and_validation(photos, tmp_path):
    """last/train_state.json names the step its val metrics come from; a resumed run keeps the last validation."""
    import json

    cfg = _cfg(photos, "train.eval_every=3", "train.ckpt_every=100", "train.best_metric=psnr")
    seen = {}

    def cb(tr):
        if tr.pos.step == 3:
            seen["val"] = dict(tr.last_val)
        if tr.pos.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    r = train_tokenizer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=6, progress=False),
                        TrainInjected(callbacks=[cb]))
    assert r.status == "interrupted" and r.exit_code == 143
    doc = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())
    assert doc["step"] == 4 and doc["val_step"] == 3 and doc["val"] == seen["val"]
    assert doc["train"]["rec_loss"] == r.history[-1]["rec_loss"] and r.history[-1]["step"] == 4
    r2 = train_tokenizer(cfg,
                         TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=6, resume="auto", progress=False))
    assert r2.status == "finished" and r2.images_per_sec and r2.images_per_sec > 0
    r3 = train_tokenizer(cfg,
                         TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=6, resume="auto", progress=False))
    assert r3.images_per_sec is None and "already finished" in r3.message
    assert r3.last_val == r2.last_val  # the resumed (finished) run still knows its last validation
