"""XQTokenizer: shapes, round trips, gradients, parameter counts (meta device)."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS
from xqtool.config import load_tokenizer_config
from xqtool.errors import TokenError
from xqtool.metrics import count_parameters
from xqtool.models.tokenizer import build_tokenizer
from xqtool.training.schedules import robusttok_perturbation


@pytest.mark.parametrize("cfg_name", ["tiny_cnn_cfg", "tiny_vit_cfg"])
def test_encode_decode_shapes_and_round_trip(cfg_name, images32, request) -> None:
    cfg = request.getfixturevalue(cfg_name)
    tok = build_tokenizer(cfg).eval()
    tokens = tok.encode(images32)
    P, L = cfg.quant.product_quant, cfg.tokens_per_branch
    assert tokens.shape == (8, P, L) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < cfg.quant.codebook_size
    images = tok.decode(tokens)
    assert images.shape == images32.shape
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, tok.reconstruct(images32))
    steps = tok.decode_progressive(tokens)
    assert len(steps) == len(cfg.scales) and torch.allclose(steps[-1], images, atol=1e-5)
    only_semantic = tok.decode_progressive(tokens, branches=[P - 1])
    assert not torch.allclose(only_semantic[-1], images)


@pytest.mark.parametrize("cfg_name", ["tiny_cnn_cfg", "tiny_vit_cfg"])
def test_training_forward_reaches_encoder(cfg_name, images32, request) -> None:
    tok = build_tokenizer(request.getfixturevalue(cfg_name)).train()
    out = tok(images32)
    assert out.recon.shape == images32.shape
    assert out.n_drop == int(8 * tok.quant_cfg.codebook_drop)
    assert out.semantic.shape == (8, tok.embed_dim, tok.latent_side, tok.latent_side)
    loss = (out.recon - images32).pow(2).mean() + out.loss["vq"] + out.loss["commit"]
    loss.backward()
    enc_grads = [p.grad for p in tok.encoder.parameters() if p.grad is not None]
    assert enc_grads and any(g.abs().sum() > 0 for g in enc_grads)
    assert tok.quant_conv.weight.grad.abs().sum() > 0


def test_bad_tokens_and_images_are_clear_errors(tiny_cnn_cfg) -> None:
    tok = build_tokenizer(tiny_cnn_cfg).eval()
    L = tiny_cnn_cfg.tokens_per_branch
    with pytest.raises(TokenError, match=r"tokens must be \[N, 2, 85\]"):
        tok.decode(torch.zeros(1, 2, L - 1, dtype=torch.long))
    bad = torch.zeros(2, 2, L, dtype=torch.long)
    bad[1, 0, 5] = 64
    with pytest.raises(TokenError):
        tok.decode(bad)
    with pytest.raises(TokenError, match=r"images must be \[B, 3, 32, 32\]"):
        tok.encode(torch.zeros(1, 3, 64, 64))


def test_msvr10p2_4096_parameter_count_on_meta() -> None:
    cfg = load_tokenizer_config(CONFIGS / "MSVR10P2-4096.yaml")
    with torch.device("meta"):
        tok = build_tokenizer(cfg)
    assert count_parameters(tok) == 172_327_456
    assert tok.tokens_per_branch == 286 and tok.num_branches == 2


def test_robusttok_perturbation_reaches_only_the_decoder_of_the_first_samples(images32) -> None:
    cfg = load_tokenizer_config(
        CONFIGS / "tiny-cnn.yaml",
        ["v_patch_nums=[8]", "alpha=1.0", "beta=0.5", "delta=8", "anneal_start=0", "anneal_end=10"],
    )
    tok = build_tokenizer(cfg).train()
    torch.manual_seed(1)
    clean = tok(images32)
    torch.manual_seed(1)
    perturbed = tok(images32, perturbation=robusttok_perturbation(cfg.quant, 0))
    changed = (clean.recon - perturbed.recon).abs().flatten(1).sum(1) > 0
    assert changed[:4].all() and not changed[4:].any()
    assert torch.equal(clean.indices, perturbed.indices)  # losses/tokens come from the clean quantization
