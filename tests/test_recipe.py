"""The training recipe exactly as the spec states it (tokenizer.md §3.1, §3.4, §3.5, §5.2, §5.6).

Expected values are computed here by hand from the spec's formulas (or by timm's own scheduler), never by
calling the formula under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xqtool.training.schedules import disc_warmup_epochs, epoch_lr
from xqtool.quantize import ProductQuantizer, build_branch_quantizer
from xqtool.quantize.vq import VectorQuantizer

S4 = (1, 2, 3, 4)


# ---------------------------------------------------------------- quantizer dropout / semantic-loss drop (§3.4, §5.2)


def test_single_scale_config_skips_first_samples_in_semantic_loss() -> None:
    """VP2-style (one scale, P = 2, codebook_drop 0.25): the semantic loss drops ⌊8·0.25⌋ = 2 samples, no scale is
    dropped (the outputs equal the eval-mode quantization)."""
    pq = ProductQuantizer([build_branch_quantizer(codebook_size=16, dim=4, scales=(4,), side=4) for _ in range(2)],
                          codebook_drop=0.25, start_drop=1)
    z = [torch.randn(8, 4, 4, 4) for _ in range(2)]
    out = pq.train()(z)
    assert out.n_drop == 2
    full = pq.eval().tokens_to_fhat(pq.quantize(z))
    torch.testing.assert_close(out.quantized, full, rtol=0, atol=1e-6)
    assert pq.eval()(z).n_drop == 0


def test_single_branch_multiscale_has_no_quantizer_dropout() -> None:
    """P = 1 with several scales: the reference does not pass codebook_drop to its quantizer → every sample keeps
    every scale (the semantic loss still skips ⌊B·codebook_drop⌋ samples)."""
    pq = ProductQuantizer([build_branch_quantizer(codebook_size=16, dim=4, scales=S4, side=4)], codebook_drop=0.5,
                          start_drop=1)
    z = [torch.randn(8, 4, 4, 4)]
    full = pq.eval().tokens_to_fhat(pq.quantize(z))
    for seed in range(4):  # start_drop 1 → dropout (if any) keeps 1…4 scales: some sample would differ
        torch.manual_seed(seed)
        out = pq.train()(z)
        torch.testing.assert_close(out.quantized, full, rtol=0, atol=1e-6)
    assert out.n_drop == 4


def _branch_losses_by_hand(q, z: torch.Tensor, keep_scales: torch.Tensor):
    """Spec §3.2 steps 1–8 written out: masked f_hat, residual for every sample, vq/commit with ratio."""
    S, B = len(q.scales), z.shape[0]
    f = z.float()
    f_rest, f_hat = f.clone(), torch.zeros_like(f)
    vq = commit = 0.0
    W = q.embedding.weight.float()
    for si, pn in enumerate(q.scales):
        r = F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != q.side else f_rest
        flat = F.normalize(r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]), dim=1)
        idx = (flat @ F.normalize(W, dim=1).t()).argmax(1)
        h = W[idx].view(B, pn, pn, -1).permute(0, 3, 1, 2)
        if si != S - 1:
            h = F.interpolate(h, size=(q.side, q.side), mode="bicubic", align_corners=False)
        h = q.quant_resi[si](h)
        m = (si < keep_scales).float().view(B, 1, 1, 1)
        f_hat = f_hat + m * h
        f_rest = f_rest - h
        ratio = m.mean()
        vq += ((m * (f_hat - f) ** 2).mean() / ratio).item()
        commit += ((m * (f_hat - f) ** 2).mean() * 0.25 / ratio).item()
    return vq / S, commit


def test_dropout_mask_enters_the_losses() -> None:
    """With quantizer dropout, vq/commit use the masked cumulative map and divide by the kept fraction."""
    torch.manual_seed(3)
    S, B = len(S4), 8
    pq = ProductQuantizer([build_branch_quantizer(codebook_size=16, dim=4, scales=S4, side=4) for _ in range(2)],
                          codebook_drop=0.5, start_drop=1)
    z = [torch.randn(B, 4, 4, 4) for _ in range(2)]
    pq.train()
    torch.manual_seed(11)
    d = torch.randint(1, S + 1, (B,))
    keep = torch.full((B,), S)
    keep[:4] = d[:4]
    assert bool((keep < S).any())
    torch.manual_seed(11)
    out = pq(z)
    want = [_branch_losses_by_hand(q, zz, keep) for q, zz in zip(pq.quantizes, z)]
    assert out.loss["vq"].item() == pytest.approx(sum(w[0] for w in want) / 2, rel=1e-5)
    assert out.loss["commit"].item() == pytest.approx(sum(w[1] for w in want) / 2, rel=1e-5)


# ---------------------------------------------------------------- codebook usage from the EMA hit counts (§3.1, §3.5)


def test_training_usage_comes_from_the_ema_hit_counts() -> None:
    """K = 4, one image of 2×2 positions: margin = 0.08·1·4/4 = 0.08. Call 1 hits code 0 four times (EMA = hist);
    calls 2… hit code 1 only: EMA₀ = 4·0.9ⁿ stays ≥ 0.08 until 0.9ⁿ < 0.02, i.e. n = 38 (0.9³⁷·4 = 0.0812)."""
    q = VectorQuantizer(4, 2, (2,), 2, l2_norm=True)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    q.train()
    at = lambda v: torch.tensor(v).view(1, 2, 1, 1).expand(1, 2, 2, 2).contiguous()  # noqa: E731
    usage = [q(at([1.0, 0.1])).stats["usage"].item()]  # code 0
    for _ in range(38):
        usage.append(q(at([0.1, 1.0])).stats["usage"].item())  # code 1
    assert usage[0] == 0.25  # EMA = [4, 0, 0, 0]
    assert usage[1] == 0.5  # EMA = [3.6, 0.4, 0, 0]: both ≥ 0.08 (the batch alone hit one code)
    assert usage[37] == 0.5  # EMA₀ = 4·0.9³⁷ = 0.0812
    assert usage[38] == 0.25  # EMA₀ = 4·0.9³⁸ = 0.0731 < 0.08
    assert q.eval()(at([1.0, 0.1])).stats["usage"].item() == 0.25  # eval: fraction hit in the batch


# ---------------------------------------------------------------- learning-rate schedules (§5.6)


def test_generator_schedule_is_timm_per_epoch_with_warmup_from_1e5() -> None:
    base, mn = 2.4e-4, 5e-5
    lr = lambda e: epoch_lr(e, base=base, epochs=200, warmup_epochs=1, warmup_lr=1e-5, min_lr=mn)  # noqa: E731
    assert lr(0) == pytest.approx(1e-5)
    assert lr(1) == pytest.approx(mn + 0.5 * (base - mn) * (1 + math.cos(math.pi / 200)))
    assert lr(100) == pytest.approx(mn + 0.5 * (base - mn))
    assert lr(200) == pytest.approx(mn) and lr(250) == pytest.approx(mn)
    # the reference's scheduler object itself: timm's cosine scheduler, stepped with step(epoch + 1)
    from timm.scheduler import create_scheduler_v2

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=200, warmup_epochs=1, warmup_lr=1e-5, min_lr=mn)
    for epoch in range(200):
        assert lr(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), epoch
        sched.step(epoch + 1)


def test_discriminator_schedule_warms_up_two_percent_of_epochs() -> None:
    assert disc_warmup_epochs(200) == 4 and disc_warmup_epochs(49) == 0
    from timm.scheduler import create_scheduler_v2

    base, epochs, start = 8e-4, 200, 56
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs - start, warmup_epochs=4, warmup_lr=1e-5,
                                   min_lr=5e-5)
    for epoch in range(epochs):
        t = max(0, epoch - start)
        got = epoch_lr(t, base=base, epochs=epochs - start, warmup_epochs=disc_warmup_epochs(epochs))
        assert got == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), epoch
        if epoch >= start:  # the reference steps it only from disc_epoch_start on
            sched.step(epoch + 1 - start)
    assert epoch_lr(2, base=base, epochs=144, warmup_epochs=4) == pytest.approx(1e-5 + 2 * (base - 1e-5) / 4)


def test_trainer_follows_the_per_epoch_schedule(tmp_path) -> None:
    """A real (tiny) run with the spec schedule: the lr logged after optimizer step k is the lr of epoch k // spe;
    epoch 0 runs at warmup_lr, epoch 1 at the cosine value (warm-up 1 epoch). The discriminator starts at epoch 1
    with a 2-epoch warm-up: after its first epoch (t = 1) its lr is halfway from warmup_lr to disc_lr."""
    from pathlib import Path

    from PIL import Image

    from conftest import photo_crops
    from xqtool.config import load_tokenizer_config
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer, TrainInjected

    root = Path(__file__).resolve().parents[1]
    photos = tmp_path / "photos"
    for split, n in (("train", 8), ("val", 4)):
        (photos / split / "c").mkdir(parents=True)
        for i, arr in enumerate(photo_crops(n, 32, seed=len(split))):
            Image.fromarray(arr).save(photos / split / "c" / f"{i}.png")
    spe = 2  # 8 images, batch 4
    cfg = load_tokenizer_config(root / "configs" / "tokenizer" / "tiny-cnn.yaml", overrides=[
        "model.ch=8", "quant.codebook_size=16", "quant.codebook_embed_dim=4", "train.global_batch_size=4",
        "train.log_every=1", "train.tracker=none", "data.max_val_images=4", f"data.data_path={photos / 'train'}",
        f"data.val_data_path={photos / 'val'}", "train.lr_schedule=epoch", "train.lr_scheduler=cosine",
        "train.epochs=4", "train.lr=1e-3", "train.disc_lr=2e-3", "train.min_lr=1e-4", "train.warmup_epochs=1",
        "train.disc_warmup_epochs=2", "loss.disc_start=-1", "loss.disc_epoch_start=1", "train.eval_every=1000",
        "train.ckpt_every=1000"])
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=2 * spe, progress=False),
                               TrainInjected(disc_overrides=dict(ndf=4, n_layers=2)))
    res = trainer.run()
    want = {0: 1e-5, 1: 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi / 4)), 2: 1e-4 + 0.5 * (1e-3 - 1e-4)}
    for h in res.history:
        assert h["lr"] == pytest.approx(want[h["step"] // spe], rel=1e-6), h["step"]
    assert trainer.opt_d.param_groups[0]["lr"] == pytest.approx(1e-5 + (2e-3 - 1e-5) / 2)


# ---------------------------------------------------------------- official keys xqtool does not act on


def test_ignored_official_keys_warn_once_each_when_not_default(tmp_path, caplog) -> None:
    from pathlib import Path

    from xqtool.config import ignored_settings, load_tokenizer_config
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer

    root = Path(__file__).resolve().parents[1]
    assert ignored_settings(load_tokenizer_config(root / "configs/tokenizer/MSBR10P2-4096.yaml")) == []
    cfg = load_tokenizer_config(root / "configs/tokenizer/tiny-cnn.yaml", overrides=[
        "loss.norm_type=gn", "quant.codebook_weight=2.0", "loss.disc_reinit=1", "loss.dependency_loss_weight=0.1",
        "train.tracker=none"])
    lines = ignored_settings(cfg)
    assert len(lines) == 4 and all("\n" not in ln for ln in lines)
    assert any(ln.startswith("loss.norm_type='gn' has no effect") for ln in lines)
    # the trainer reports them (one warning line each) before it builds anything
    cfg.loss.detail_guide = "sam"  # and refuses detail guidance on the class token (next test) right after
    with caplog.at_level("WARNING"), pytest.raises(Exception):
        TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", progress=False))
    warned = [r.getMessage() for r in caplog.records if "has no effect in xqtool" in r.getMessage()]
    assert sorted(warned) == sorted(lines)


def test_detail_guidance_on_the_class_token_is_refused(tmp_path) -> None:
    from pathlib import Path

    from xqtool.config import load_tokenizer_config
    from xqtool.errors import ConfigError
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_tokenizer_config(root / "configs/tokenizer/tiny-cnn.yaml",
                                overrides=["loss.detail_guide=sam", "loss.guide_type_2=class", "train.tracker=none"])
    with pytest.raises(ConfigError, match=r"guide_type_2=patch"):
        TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", progress=False))
    msbr = load_tokenizer_config(root / "configs/tokenizer/MSBR10P2-4096.yaml")
    assert msbr.loss.detail_guide == "sam" and msbr.loss.guide_type_2 == "patch"


# ---------------------------------------------------------------- official .pt whose args cannot express its ViT size


def _official_tiny_vit(path, width: int, heads: int, depth: int):
    """A tiny-ViT tokenizer saved as an official XQ-GAN .pt whose args (like the reference's) name the model only."""
    import argparse
    from pathlib import Path

    from xqtool.config import config_to_dict, load_tokenizer_config
    from xqtool.models.tokenizer import build_tokenizer

    root = Path(__file__).resolve().parents[1]
    cfg = load_tokenizer_config(root / "configs/tokenizer/tiny-vit.yaml", overrides=[
        f"model.vit_embed_dim={width}", f"model.vit_num_heads={heads}", f"model.vit_depth={depth}"])
    tok = build_tokenizer(cfg).eval()
    sd = {("quantizes." + k[len("quantizer.quantizes."):] if k.startswith("quantizer.quantizes.") else k): v
          for k, v in tok.state_dict().items()}
    flat = {k: v for sec in config_to_dict(cfg).values() for k, v in sec.items() if not k.startswith("vit_")}
    torch.save({"model": sd, "ema": sd, "steps": 1, "args": argparse.Namespace(**flat)}, path)
    return tok


def test_official_file_with_a_smaller_vit_loads_and_inspects_at_its_real_size(tmp_path) -> None:
    from xqtool.checkpoints import load_tokenizer
    from xqtool.metrics import count_parameters
    from xqtool.tasks.inspect import inspect_target

    path = tmp_path / "tiny.pt"
    ref = _official_tiny_vit(path, width=128, heads=2, depth=3)
    report = inspect_target(str(path))
    assert report.parameters["total"] == count_parameters(ref)  # not the ViT-B its args name
    assert (report.config.model.vit_embed_dim, report.config.model.vit_depth) == (128, 3)
    tok = load_tokenizer(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), ref.encode(x))
    torch.testing.assert_close(tok.reconstruct(x), ref.reconstruct(x), rtol=0, atol=1e-6)


def test_official_file_with_unknown_head_count_is_refused_in_one_line(tmp_path) -> None:
    from xqtool.checkpoints import load_tokenizer
    from xqtool.errors import CheckpointError
    from xqtool.tasks.inspect import inspect_target

    path = tmp_path / "tiny.pt"
    _official_tiny_vit(path, width=32, heads=2, depth=2)
    for call in (lambda: load_tokenizer(path), lambda: inspect_target(str(path))):
        with pytest.raises(CheckpointError, match="attention heads") as err:
            call()
        assert "\n" not in str(err.value)


def test_lfq_entropy_uses_only_the_kept_samples() -> None:
    """Spec §3.3: the entropy term of scale si is computed on the samples with m_b = 1 only, divided by the kept
    fraction, and the total divided by S (hand-written loop; boolean mask, not the reference's integer one)."""
    from xqtool.quantize.lfq import MultiScaleLFQ

    torch.manual_seed(5)
    B, D, S = 6, 4, len(S4)
    q = MultiScaleLFQ(16, D, S4, 4, entropy_weight=0.1).train()
    z = torch.randn(B, D, 4, 4)
    keep_scales = torch.tensor([1, 2, 4, 4, 4, 4])
    got = q(z, keep_scales).loss["entropy"].item()

    def h(p):
        return -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))

    f = F.normalize(z, dim=1)
    f_rest, f_hat, ent = f.clone(), torch.zeros_like(f), 0.0
    for si, pn in enumerate(S4):
        s = q.scaler[si]
        keep = si < keep_scales
        x = (f - f_hat)[keep].permute(0, 2, 3, 1).reshape(-1, D)
        p = torch.sigmoid(-4 * x * s)
        ent += ((h(p).sum(1).mean() - h(p.mean(0)).sum()) * 0.1 / keep.float().mean()).item()
        r = F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != 4 else f_rest
        code = torch.where(r > 0, s, -s)
        if si != S - 1:
            code = F.interpolate(code, size=(4, 4), mode="bicubic", align_corners=False)
        code = q.quant_resi[si](code)
        f_hat = f_hat + keep.float().view(B, 1, 1, 1) * code
        f_rest = f_rest - code
    assert got == pytest.approx(ent / S, rel=1e-5)
