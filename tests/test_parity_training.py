"""Training pieces the golden fixtures do not cover, checked against values computed here from the spec:
the GAN weight reaching the generator after disc_start, LeCam's EMAs, the DINO discriminator's taps and input
normalisation, BatchNormLocal groups, gradient accumulation (both trainers), VAR p_drop and shared AdaLN, and
LoRA-nested official checkpoints (tokenizer.md §5.1, §5.4, §5.5, §6; var.md §2.2, §2.8)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import photo_crops, to_tensor
from xqtool.config import config_to_dict, load_tokenizer_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.ch=8", "quant.codebook_size=16", "quant.codebook_embed_dim=4", "train.global_batch_size=4",
         "train.log_every=1", "train.tracker=none", "data.max_val_images=4", "train.eval_every=1000",
         "train.ckpt_every=1000", "train.ema=false"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pt") / "photos"
    for split, n in (("train", 8), ("val", 4)):
        (root / split / "c").mkdir(parents=True)
        for i, arr in enumerate(photo_crops(n, 32, seed=len(split))):
            Image.fromarray(arr).save(root / split / "c" / f"{i}.png")
    return root


def _tok_cfg(photos: Path, *extra: str):
    return load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml", overrides=[
        *SMALL, f"data.data_path={photos / 'train'}", f"data.val_data_path={photos / 'val'}", *extra])


# ---------------------------------------------------------------- GAN weight, disc_start, LeCam (§5.1, §5.5)


def test_adaptive_gan_weight_reaches_the_generator_only_from_disc_start(photos: Path, tmp_path: Path) -> None:
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer, TrainInjected

    torch.manual_seed(0)
    cfg = _tok_cfg(photos, "loss.disc_type=patchgan", "loss.disc_start=3", "loss.disc_weight=0.5",
                   "loss.disc_adaptive_weight=true", "loss.lecam_loss_weight=0.001")
    trainer = TokenizerTrainer(cfg, TokenizerRunOptions(output_dir=tmp_path / "run", max_steps=4, progress=False),
                               TrainInjected(disc_overrides=dict(ndf=4, n_layers=2)))
    hist = trainer.run().history
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    for h in hist:
        quant = h["rec_loss"] + h["vq_loss"] + h["commit_loss"] + h["entropy_loss"]
        if h["step"] < 3:  # before disc_start: no adversarial term at all
            assert h["disc_weight"] == 0.0 and "generator_adv_loss" not in h
            assert h["train_loss"] == pytest.approx(quant, rel=1e-6)
        else:  # L = nll + quantizer terms + λ·w·L_adv, λ = ‖∇nll‖/(‖∇adv‖ + 1e-4) > 0
            assert h["disc_weight"] == 0.5 and 0 < h["disc_adaptive_weight"] <= 1e4
            want = quant + h["disc_adaptive_weight"] * 0.5 * h["generator_adv_loss"]
            assert h["train_loss"] == pytest.approx(want, rel=1e-5)
            assert h["generator_adv_loss"] != 0.0
    # LeCam EMAs (decay 0.999, init 0) moved by the mean logits of the discriminator steps (3 and 4)
    r3, r4 = hist[2]["logits_real"], hist[3]["logits_real"]
    f3, f4 = hist[2]["logits_fake"], hist[3]["logits_fake"]
    assert trainer.lecam.ema_real.item() == pytest.approx(0.999 * 0.001 * r3 + 0.001 * r4, rel=1e-4)
    assert trainer.lecam.ema_fake.item() == pytest.approx(0.999 * 0.001 * f3 + 0.001 * f4, rel=1e-4)


def test_lecam_regulariser_by_hand() -> None:
    from xqtool.losses import LeCam

    lecam = LeCam()  # decay 0.999
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-0.5, 0.25, 3.0])
    lecam.update(real, fake)
    er, ef = 0.001 * real.mean().item(), 0.001 * fake.mean().item()
    want = sum(max(r - ef, 0) ** 2 for r in real.tolist()) / 3 + sum(max(er - f, 0) ** 2 for f in fake.tolist()) / 3
    assert lecam(real, fake).item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- DINO discriminator (§5.4)


def test_dino_discriminator_taps_and_normalisation() -> None:
    """Taps: the embedding output and blocks 2, 5, 8, 11 (of 12), each read out as patch tokens + cls token;
    input x in [-1, 1] normalised as x·0.5/std + (0.5 − mean)/std."""
    from xqtool.models.discriminators import BatchNormLocal, DinoDiscriminator, build_dino_backbone

    torch.manual_seed(0)
    vit = build_dino_backbone(img_size=32, patch_size=8, embed_dim=16, depth=12, num_heads=2)
    disc = DinoDiscriminator(vit)
    assert disc.hooks == (2, 5, 8, 11) and len(disc.heads) == 5
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    h = x * (0.5 / std).view(1, 3, 1, 1) + ((0.5 - mean) / std).view(1, 3, 1, 1)
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(h)))
    taps = [h]
    for blk in vit.blocks:
        h = blk(h)
        taps.append(h)
    want = [taps[i] for i in (0, 3, 6, 9, 12)]  # embedding, then after blocks 2, 5, 8, 11
    got = disc._features(x)
    assert len(got) == 5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, (w[:, 1:] + w[:, :1]).transpose(1, 2), rtol=1e-5, atol=1e-5)
    out = disc(x)
    assert out.shape == (2, 5 * 16)
    norms = [m for m in disc.heads.modules() if isinstance(m, BatchNormLocal)]
    assert norms and all(m.virtual_bs == 8 and m.eps == 1e-6 for m in norms)


def test_batchnorm_local_normalises_each_group_of_eight() -> None:
    from xqtool.models.discriminators import BatchNormLocal

    torch.manual_seed(1)
    bn = BatchNormLocal(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = torch.randn(20, 3, 5) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1) + 4
    y = bn(x)
    for lo, hi in ((0, 8), (8, 16), (16, 20)):  # groups of 8, 8 and the remaining 4
        g = x[lo:hi].double()
        m = g.mean(dim=(0, 2), keepdim=True)
        v = ((g - m) ** 2).mean(dim=(0, 2), keepdim=True)  # biased
        want = (g - m) / torch.sqrt(v + 1e-6) * bn.weight.double().view(1, 3, 1) + bn.bias.double().view(1, 3, 1)
        torch.testing.assert_close(y[lo:hi].double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradient accumulation == one big batch


@pytest.mark.filterwarnings("ignore:Seems like .optimizer.step")
def test_tokenizer_grad_accum_equals_one_big_batch(photos: Path, tmp_path: Path) -> None:
    """grad_accum 2 × 2 images gives the gradients of one 4-image batch at every optimizer step (compared on the
    gradients: AdamW turns a gradient at round-off level into a full ±lr step, so weights are not comparable)."""
    from xqtool.training import TokenizerRunOptions, TokenizerTrainer

    runs = []
    for accum in (1, 2):
        torch.manual_seed(0)
        cfg = _tok_cfg(photos, "loss.disc_type=none", f"train.grad_accum={accum}", "train.lr=1e-3")
        trainer = TokenizerTrainer(cfg,
                                   TokenizerRunOptions(output_dir=tmp_path / f"a{accum}", max_steps=2, progress=False))
        inner = trainer.opt_g.optimizer
        names = {id(p): n for n, p in trainer.unwrapped.named_parameters()}
        grads, real_step = [], inner.step

        def step(*a, _inner=inner, _grads=grads, _real=real_step, _names=names, **kw):
            _grads.append({_names[id(p)]: p.grad.detach().clone() for g in _inner.param_groups for p in g["params"]
                           if p.grad is not None and id(p) in _names})
            return _real(*a, **kw)

        inner.step = step
        res = trainer.run()
        runs.append((grads, [h["rec_loss"] for h in res.history]))
    (g1, l1), (g2, l2) = runs
    assert len(g1) == len(g2) == 2
    assert l2 == pytest.approx(l1, rel=1e-5)  # the logged loss is the big-batch mean
    for a, b in zip(g1, g2):
        assert set(a) == set(b)
        scale = max(v.abs().max().item() for v in a.values())  # round-off is relative to the largest gradients
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5 * scale)


def test_var_grad_accum_equals_one_big_batch(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from xqtool.config import load_var_config
    from xqtool.data.tokens import TokenManifest, write_tokens
    from xqtool.models.tokenizer import build_tokenizer
    from xqtool.training import TrainInjected, VARRunOptions, train_var

    torch.manual_seed(0)
    tok = build_tokenizer(load_tokenizer_config(ROOT / "configs/tokenizer/tiny-cnn.yaml")).eval()
    tokens = tok.encode(to_tensor(photo_crops(16, 32, seed=3)))
    write_tokens(tmp_path / "t.npy", tokens.numpy(),
                 TokenManifest.from_tokenizer(tok, labels=[i % 10 for i in range(16)], keys=[str(i) for i in range(16)]))
    out = []
    for accum in (1, 2):
        torch.manual_seed(0)
        cfg = load_var_config(ROOT / "configs/var/tiny.yaml", [
            f"data.tokens={tmp_path / 't.npy'}", f"train.results_dir={tmp_path / f'v{accum}'}", "train.max_steps=2",
            f"train.grad_accum={accum}", "train.ckpt_every=0", "model.cond_drop_rate=0.0", "train.log_every=1"])
        res = train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
        out.append((load_file(str(res.model_dir / "model.safetensors")), [h["loss"] for h in res.history]))
    (w1, l1), (w2, l2) = out
    assert l2 == pytest.approx(l1, rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-6)


# ---------------------------------------------------------------- VAR p_drop (§2.8) and shared AdaLN (§2.2)


def _tiny_var(**kw):
    from xqtool.config import VARModelConfig
    from xqtool.models.var import VAR

    cfg = VARModelConfig(depth=2, width=32, num_heads=2, num_classes=4, patch_nums=(1, 2, 3), codebook_size=8,
                         num_branches=2, branch_dim=4, cond_drop_rate=0.0, drop_path_rate=0.0, **kw)
    return VAR(cfg)


def test_p_drop_replaces_non_start_tokens_by_empty_emb_at_the_annealed_rate() -> None:
    torch.manual_seed(0)
    var = _tiny_var(p_drop=0.6)
    assert "empty_emb.weight" in var.state_dict()
    seen = {}
    var.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    labels, x = torch.tensor([0, 1, 2, 3] * 4), torch.randn(16, var.L - 1, 8)
    word = var.word_embed(x).detach()

    sos = (var.class_emb(labels) + var.pos_start[0]).detach()  # the start token is never replaced

    def replaced() -> torch.Tensor:
        var(labels, x)
        emb = seen["x"] - var.lvl_pos().detach()
        torch.testing.assert_close(emb[:, 0], sos, rtol=1e-5, atol=1e-5)
        tok = emb[:, 1:]
        hit = (tok - var.empty_emb.weight.detach().view(1, 1, -1)).abs().amax(-1) < 1e-5
        kept = (tok - word).abs().amax(-1) < 1e-5
        assert bool((hit ^ kept).all())  # every non-start token is either kept or exactly empty_emb
        return hit.float().mean()

    var.eval()
    assert replaced().item() == 0.0  # eval: never
    var.train()
    var.p_drop_scale = 0.0  # last epoch: rate U(0, 0)
    assert replaced().item() == 0.0
    var.p_drop_scale = 0.5  # rate ~ U(0, 0.6·0.5): mean 0.15
    rates = torch.stack([replaced() for _ in range(100)])
    assert rates.max().item() <= 0.3 + 0.1 and rates.mean().item() == pytest.approx(0.15, abs=0.035)


def test_shared_adaln_equals_per_block_linear_with_the_shared_weights() -> None:
    """saln: block i's modulation = SiLU→Linear shared by all blocks, plus its own ada_gss [1, 1, 6, C]; that is a
    per-block AdaLN whose weight is the shared one and whose bias is the shared bias + ada_gss."""
    torch.manual_seed(0)
    shared = _tiny_var(shared_aln=True).eval()
    sd = shared.state_dict()
    assert "shared_ada_lin.1.weight" in sd and "blocks.0.ada_gss" in sd and "blocks.0.ada_lin.1.weight" not in sd
    with torch.no_grad():
        for i in range(2):
            sd[f"blocks.{i}.ada_gss"].normal_(0, 0.3)
        sd["shared_ada_lin.1.weight"].normal_(0, 0.3)
    shared.load_state_dict(sd)
    plain = _tiny_var(shared_aln=False).eval()
    psd = plain.state_dict()
    for k in psd:
        if k in sd:
            psd[k] = sd[k]
    for i in range(2):
        psd[f"blocks.{i}.ada_lin.1.weight"] = sd["shared_ada_lin.1.weight"]
        psd[f"blocks.{i}.ada_lin.1.bias"] = sd["shared_ada_lin.1.bias"] + sd[f"blocks.{i}.ada_gss"].reshape(-1)
    plain.load_state_dict(psd)
    labels, x = torch.tensor([0, 3]), torch.randn(2, shared.L - 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(shared(labels, x), plain(labels, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- LoRA-nested official checkpoints (§4, §6)


def test_lora_nested_official_checkpoint_merges_to_the_lora_models_output(tmp_path: Path) -> None:
    from xqtool.checkpoints import load_tokenizer, save_tokenizer
    from xqtool.models.tokenizer import build_tokenizer
    from xqtool.models.lora import apply_tuning, merge_lora

    torch.manual_seed(0)
    cfg = load_tokenizer_config(ROOT / "configs/tokenizer/tiny-vit.yaml")
    tok = build_tokenizer(cfg)
    apply_tuning(tok, "encoder", "lora")
    apply_tuning(tok, "decoder", "lora")
    with torch.no_grad():  # trained adapters: B ≠ 0 (peft initialises it to zero)
        for name, p in tok.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tok.eval()
    sd = tok.state_dict()
    assert any(".base_model.model." in k and "lora_A.default.weight" in k for k in sd)
    official = {("quantizes." + k[len("quantizer.quantizes."):] if k.startswith("quantizer.quantizes.") else k): v
                for k, v in sd.items()}
    flat = {k: v for sec in config_to_dict(cfg).values() for k, v in sec.items()}
    torch.save({"model": official, "ema": official, "args": argparse.Namespace(**flat)}, tmp_path / "lora.pt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = tok.decode_fhat(tok.quantizer.tokens_to_fhat(tok.encode(x)))
        ids = tok.encode(x)
    loaded = load_tokenizer(tmp_path / "lora.pt")  # W ← W + (alpha/r)·B·A, alpha = r
    assert not any("lora" in k for k in loaded.state_dict())
    assert torch.equal(loaded.encode(x), ids)
    torch.testing.assert_close(loaded.reconstruct(x), want, rtol=0, atol=1e-5)
    # xqtool's own merged export gives the same output too
    save_tokenizer(tmp_path / "merged", merge_lora(tok))
    torch.testing.assert_close(load_tokenizer(tmp_path / "merged").reconstruct(x), want, rtol=0, atol=1e-5)


def test_attention_by_hand_with_the_scale_clamp() -> None:
    """var.md §2.2: qkv bias [q_bias, 0, v_bias]; per head q̂ = q/‖q‖, k̂ = k/‖k‖; q̂ · exp(min(scale_mul, ln 100));
    softmax(q̂ k̂ᵀ) with scale 1; heads back in head-major channel order; proj. Head 0's scale_mul (6) is clamped."""
    import math

    from xqtool.models.var import SelfAttention

    torch.manual_seed(0)
    C, H, T = 16, 2, 5
    attn = SelfAttention(C, H, attn_l2_norm=True)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        attn.scale_mul_1H11.copy_(torch.tensor([6.0, 0.5]).view(1, H, 1, 1))
    x = torch.randn(2, T, C)
    qkv = x @ attn.mat_qkv.weight.t() + torch.cat([attn.q_bias, torch.zeros(C), attn.v_bias])
    q, k, v = qkv.split(C, dim=-1)
    hd = C // H
    out = torch.zeros(2, T, C)
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        qh = F.normalize(q[..., sl], dim=-1) * math.exp(min([6.0, 0.5][h], math.log(100.0)))
        kh = F.normalize(k[..., sl], dim=-1)
        out[..., sl] = (qh @ kh.transpose(1, 2)).softmax(-1) @ v[..., sl]
    want = out @ attn.proj.weight.t() + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
