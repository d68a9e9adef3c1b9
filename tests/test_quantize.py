"""Tests of xqtool.quantize: branch quantizers (VQ, multi-scale VQ, LFQ/BSQ), φ table, product quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import LAYOUTS
from xqtool.errors import ConfigError, TokenError
from xqtool.quantize import (
    MultiScaleLFQ,
    MultiScaleVQ,
    Phi,
    ProductQuantizer,
    VectorQuantizer,
    as_multiscale,
    build_branch_quantizer,
    phi_index_table,
)

S10 = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
SMALL = (1, 2, 3, 5)


def _make(kind: str, **kw):
    if kind == "vq":
        return build_branch_quantizer(codebook_size=64, dim=8, scales=(6,), side=6, **kw)
    if kind == "msvq":
        return build_branch_quantizer(codebook_size=64, dim=8, scales=SMALL, side=5, **kw)
    if kind == "lfq":
        return build_branch_quantizer(codebook_size=64, dim=6, scales=SMALL, side=5, lfq=True, **kw)
    raise ValueError(kind)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids spin-wait stalls on a shared CPU; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# ---- φ ----------------------------------------------------------------------------------------


def test_phi_table_matches_spec():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(10, 1) == [0] * 10
    assert phi_index_table(10, 0) == list(range(10))
    assert phi_index_table(1, 4) == [0]
    # general rule, K = 2: ticks 0.25, 0.75; si/(S-1) = 0, .25, .5 (tie -> first), .75, 1
    assert phi_index_table(5, 2) == [0, 0, 0, 1, 1]
    # K = 4 with another S follows linspace(1/12, 11/12, 4)
    ticks = np.linspace(1 / 12, 11 / 12, 4)
    assert phi_index_table(6, 4) == [int(np.argmin(np.abs(ticks - s / 5))) for s in range(6)]
    q = MultiScaleVQ(16, 4, S10, 11)
    assert len(q.quant_resi.qresi_ls) == 4
    assert q.quant_resi[2] is q.quant_resi.qresi_ls[1] and q.quant_resi[7] is q.quant_resi.qresi_ls[3]


def test_phi_formula():
    phi = Phi(3, 0.5)
    x = torch.randn(2, 3, 5, 5)
    ref = 0.5 * x + 0.5 * F.conv2d(x, phi.weight, phi.bias, padding=1)
    torch.testing.assert_close(phi(x), ref)


# ---- the contract on all three kinds --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vq", "msvq", "lfq"])
def test_indices_in_range_and_decode_reproduces_forward(kind):
    q = _make(kind).eval()
    z = torch.randn(3, q.dim, q.side, q.side)
    out = q(z)
    ids = q.quantize_indices(z)
    assert len(ids) == len(q.scales)
    for idx, pn in zip(ids, q.scales):
        assert idx.shape == (3, pn * pn) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < q.codebook_size
    for a, b in zip(ids, out.indices):
        assert torch.equal(a, b)
    fhat = q.indices_to_fhat(ids)
    assert fhat.shape == z.shape
    torch.testing.assert_close(fhat, out.quantized, rtol=0, atol=1e-6)
    steps = q.indices_to_fhat(ids, cumulative=True)
    assert len(steps) == len(q.scales)
    torch.testing.assert_close(steps[-1], fhat, rtol=0, atol=0)
    assert q.num_tokens == sum(pn * pn for pn in q.scales)
    assert out.stats["usage"].shape == (len(q.scales),) and out.stats["perplexity"].shape == (len(q.scales),)
    assert bool((out.stats["usage"] > 0).all()) and bool((out.stats["perplexity"] >= 1 - 1e-5).all())
    # eval forward never touches the usage EMA
    assert float(q.ema_vocab_hit_SV.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", ["vq", "msvq", "lfq"])
def test_straight_through_gradient_and_ema(kind):
    q = _make(kind, entropy_weight=0.1).train()
    z = torch.randn(2, q.dim, q.side, q.side, requires_grad=True)
    out = q(z)
    assert set(out.loss) == {"vq", "commit", "entropy"}
    assert all(torch.isfinite(v) for v in out.loss.values())
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    # first training call copies the hit counts of scale 0: B * pn0**2 hits
    ema = q.ema_vocab_hit_SV if q.ema_vocab_hit_SV.dim() == 1 else q.ema_vocab_hit_SV[0]
    assert float(ema.sum()) == pytest.approx(2 * q.scales[0] ** 2)


def test_codebook_and_phi_receive_gradients():
    q = _make("msvq").train()
    z = torch.randn(2, q.dim, q.side, q.side)
    out = q(z)
    out.loss["vq"].backward()
    assert float(q.embedding.weight.grad.abs().sum()) > 0
    assert float(q.quant_resi.qresi_ls[0].weight.grad.abs().sum()) > 0


def test_loss_normalisation_reference_behaviour():
    z = torch.randn(2, 8, 5, 5)
    msvq = _make("msvq", beta=0.25)
    o = msvq(z)  # vq /= S, commit not: commit = beta * S * vq
    torch.testing.assert_close(o.loss["commit"], 0.25 * len(SMALL) * o.loss["vq"], rtol=1e-5, atol=1e-7)
    lfq = _make("lfq", beta=0.25)
    o = lfq(torch.randn(2, 6, 5, 5))  # LFQ divides both by S
    torch.testing.assert_close(o.loss["commit"], 0.25 * o.loss["vq"], rtol=1e-5, atol=1e-7)
    assert float(o.loss["entropy"]) == 0.0  # entropy_weight 0


@pytest.mark.parametrize("soft", [True, False])
def test_lfq_entropy_loss_has_gradient(soft):
    q = _make("lfq", entropy_weight=0.5, soft_entropy=soft)
    z = torch.randn(4, 6, 5, 5, requires_grad=True)
    out = q(z, torch.tensor([1, 4, 4, 2]))
    ent = out.loss["entropy"]
    assert torch.isfinite(ent.detach()) and float(ent.detach()) != 0.0
    ent.backward()
    assert float(z.grad.abs().sum()) > 0


# ---- multi-scale reconstruction ---------------------------------------------------------------


def _astronaut_latent(dim: int) -> torch.Tensor:
    skimage = pytest.importorskip("skimage")
    from skimage import transform

    img = transform.resize(skimage.data.astronaut(), (11, 11), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1) * 2 - 1
    f = torch.einsum("dc,chw->dhw", torch.randn(dim, 3), x)[None]
    return torch.cat([f, f.flip(-1), f.flip(-2), f.transpose(-1, -2)])  # [4, D, 11, 11], smooth


def test_multiscale_error_falls_as_scales_are_added():
    D = 4
    f = _astronaut_latent(D)
    # dense Gaussian codebook with a zero row, squared-L2 search, φ = identity: a pure residual pyramid
    q = build_branch_quantizer(codebook_size=1024, dim=D, scales=S10, side=11, l2_norm=False)
    with torch.no_grad():
        q.embedding.weight.normal_().mul_(f.std())
        q.embedding.weight[0] = 0
        for conv in q.quant_resi.qresi_ls:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[range(D), range(D), 1, 1] = 1.0
    q.eval()
    steps = q.indices_to_fhat(q.quantize_indices(f), cumulative=True)
    err = [float((f - s).norm() / f.norm()) for s in steps]
    assert all(b <= a + 0.01 for a, b in zip(err, err[1:])), err
    assert err[-1] < 0.25 and err[-1] < err[0] / 3, err
    # default cosine-search quantizer with a random codebook also refines coarse-to-fine
    q2 = build_branch_quantizer(codebook_size=256, dim=D, scales=S10, side=11).eval()
    steps = q2.indices_to_fhat(q2.quantize_indices(f), cumulative=True)
    err2 = [float((f - s).norm() / f.norm()) for s in steps]
    assert err2[-1] < err2[0], err2


# ---- LFQ / BSQ ------------------------------------------------------------------------------------


def test_lfq_bits_roundtrip_and_convention():
    q = _make("lfq")
    idx = torch.randint(0, 64, (3, 25))
    assert torch.equal(q.bits_to_indices(q.indices_to_bits(idx)), idx)
    # channel k is bit k (LSB = channel 0); > 0 -> 1, exactly 0 -> 0
    r = -torch.ones(1, 6, 1, 1)
    r[0, 0] = 0.3
    r[0, 2] = 2.0
    r[0, 5] = 0.0
    assert int(q.lookup(r, 0)) == 1 + 4
    code = q.codes(torch.tensor([[5]]), 0).flatten()
    s = float(q.scaler[0])
    torch.testing.assert_close(code, torch.tensor([s, -s, s, -s, -s, -s]))
    with pytest.raises(ConfigError):
        build_branch_quantizer(codebook_size=100, dim=6, scales=SMALL, side=5, lfq=True)


def test_bsq_lies_on_sphere():
    q = build_branch_quantizer(codebook_size=4096, dim=12, scales=S10, side=11, lfq=True, l2_norm=True)
    assert "scaler" in q.state_dict() and "mask" not in q.state_dict() and "codebook" not in q.state_dict()
    torch.testing.assert_close(q.scaler, torch.full((10,), 12 ** -0.5))
    z = torch.randn(2, 12, 11, 11) * 5
    ids = q.quantize_indices(z)
    for si, idx in enumerate(ids):
        norms = q.codes(idx, si).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    torch.testing.assert_close(q._prepare_input(z).norm(dim=1), torch.ones(2, 11, 11))


def test_single_scale_vq_outputs_unit_vectors():
    q = _make("vq", l2_norm=True)
    z = torch.randn(2, 8, 6, 6) * 3
    out = q(z)
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 6, 6))
    with pytest.raises(ConfigError):
        as_multiscale(q).indices_to_var_input(out.indices)


def test_eval_cache_follows_weight_changes():
    q = _make("msvq").eval()
    z = torch.randn(2, 8, 5, 5)
    before = q.quantize_indices(z)
    other = _make("msvq").eval()  # different random codebook
    q.load_state_dict(other.state_dict())
    after = q.quantize_indices(z)
    assert all(torch.equal(a, b) for a, b in zip(after, other.quantize_indices(z)))
    assert not all(torch.equal(a, b) for a, b in zip(before, after))
    # `.data` edits (e.g. an EMA helper) do not bump the version counter; the value probe catches them
    third = _make("msvq").eval()
    q.embedding.weight.data.copy_(third.embedding.weight)
    q.quant_resi.load_state_dict(third.quant_resi.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q.quantize_indices(z), third.quantize_indices(z)))


# ---- VAR interface ---------------------------------------------------------------------------------


def test_var_input_matches_hand_loop_and_var_next():
    q = _make("msvq").eval()
    B, D, H = 2, 8, 5
    ids = q.quantize_indices(torch.randn(B, D, H, H))
    f_hat = torch.zeros(B, D, H, H)
    ref = []
    for si in range(len(SMALL) - 1):
        pn = SMALL[si]
        e = q.embedding.weight[ids[si]].view(B, pn, pn, D).permute(0, 3, 1, 2)
        up = F.interpolate(e, size=(H, H), mode="bicubic", align_corners=False)
        conv = q.quant_resi.qresi_ls[phi_index_table(len(SMALL), 4)[si]]
        f_hat = f_hat + 0.5 * up + 0.5 * F.conv2d(up, conv.weight, conv.bias, padding=1)
        nxt = F.adaptive_avg_pool2d(f_hat, SMALL[si + 1])
        ref.append(nxt.flatten(2).transpose(1, 2))
    ref = torch.cat(ref, dim=1)
    got = q.indices_to_var_input(ids)
    assert got.shape == (B, q.num_tokens - SMALL[0] ** 2, D)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # stepping with var_next reproduces var_input and the decoded f_hat
    f_hat, chunks = torch.zeros(B, D, H, H), []
    for si in range(len(SMALL)):
        f_hat, nxt = q.var_step(si, f_hat, q.codes(ids[si], si))
        if si < len(SMALL) - 1:
            chunks.append(nxt.flatten(2).transpose(1, 2))
        else:
            assert nxt is None
    torch.testing.assert_close(torch.cat(chunks, dim=1), got, rtol=0, atol=1e-6)
    torch.testing.assert_close(f_hat, q.indices_to_fhat(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lfq", [False, True])
def test_product_var_interface(lfq):
    dim = 6 if lfq else 8
    pq = ProductQuantizer([build_branch_quantizer(codebook_size=64, dim=dim, scales=SMALL, side=5, lfq=lfq)
                           for _ in range(2)]).eval()
    B = 3
    tokens = pq.quantize([torch.randn(B, dim, 5, 5) for _ in range(2)])
    assert tokens.shape == (B, 2, pq.num_tokens)
    vin = pq.var_input(tokens)
    assert vin.shape == (B, pq.num_tokens - 1, 2 * dim)
    f_hat, chunks = torch.zeros(B, 2 * dim, 5, 5), []
    for si, (b, e) in enumerate(pq.scale_offsets):
        f_hat, nxt = pq.var_next(si, f_hat, tokens[:, :, b:e])
        if nxt is not None:
            chunks.append(nxt)
    torch.testing.assert_close(torch.cat(chunks, dim=1), vin, rtol=0, atol=1e-6)
    torch.testing.assert_close(f_hat, pq.tokens_to_fhat(tokens), rtol=0, atol=1e-6)
    # branch 0 channels first
    torch.testing.assert_close(vin[..., :dim], pq.quantizes[0].indices_to_var_input(pq.split_tokens(tokens)[0]))
    cum = pq.tokens_to_fhat(tokens, cumulative=True)
    assert len(cum) == len(SMALL) and torch.equal(cum[-1], pq.tokens_to_fhat(tokens))


# ---- product quantizer ------------------------------------------------------------------------------


def test_product_forward_layout():
    pq = ProductQuantizer([_make("msvq") for _ in range(2)]).eval()
    z = [torch.randn(2, 8, 5, 5) for _ in range(2)]
    out = pq(z)
    assert out.quantized.shape == (2, 16, 5, 5) and out.indices.shape == (2, 2, pq.num_tokens)
    assert out.stats["usage"].shape == (2, 4) and out.stats["perplexity"].shape == (2, 4)
    assert out.n_drop == 0
    assert torch.equal(out.quantized[:, :8], out.branch_outputs[0])
    assert torch.equal(out.indices, pq.quantize(z))
    assert torch.equal(out.indices[:, 1], torch.cat(pq.quantizes[1].quantize_indices(z[1]), dim=1))
    torch.testing.assert_close(out.quantized, pq.tokens_to_fhat(out.indices), rtol=0, atol=1e-6)
    assert pq.scale_offsets == [(0, 1), (1, 5), (5, 14), (14, 39)]


def test_quantizer_dropout_first_samples_only():
    S, B, start = len(S10), 8, 3
    pq = ProductQuantizer([build_branch_quantizer(codebook_size=32, dim=4, scales=S10, side=11) for _ in range(2)],
                          codebook_drop=0.5, start_drop=start)
    z = [torch.randn(B, 4, 11, 11) for _ in range(2)]
    pq.eval()
    tokens = pq.quantize(z)
    cum = pq.tokens_to_fhat(tokens, cumulative=True)
    pq.train()
    for seed in range(3):
        torch.manual_seed(seed)
        d = torch.randint(start, S + 1, (B,))
        torch.manual_seed(seed)
        out = pq(z)
        assert out.n_drop == 4
        assert torch.equal(out.indices, tokens)  # residual updated for every sample: indices unchanged
        for b in range(B):
            kept = int(d[b]) if b < out.n_drop else S
            assert kept >= start
            torch.testing.assert_close(out.quantized[b], cum[kept - 1][b], rtol=0, atol=1e-6)
    assert any(int(v) < S for v in d[:4])  # some sample really dropped scales
    pq.eval()
    assert pq(z).n_drop == 0


def test_branch_n_scales_mask():
    q = _make("msvq").eval()
    z = torch.randn(3, 8, 5, 5)
    full = q.indices_to_fhat(q.quantize_indices(z), cumulative=True)
    out = q(z, torch.tensor([1, 4, 2]))
    for b, k in enumerate([1, 4, 2]):
        torch.testing.assert_close(out.quantized[b], full[k - 1][b], rtol=0, atol=1e-6)


def test_token_errors():
    pq = ProductQuantizer([_make("msvq") for _ in range(2)])
    tokens = torch.zeros(3, 2, pq.num_tokens, dtype=torch.long)
    tokens[1, 1, 7] = 64  # scale 2 (offsets 5..14), position 2
    with pytest.raises(TokenError, match=r"row 1, branch 1, scale 2.*64.*0\.\.63"):
        pq.tokens_to_fhat(tokens)
    with pytest.raises(TokenError, match="integers"):
        pq.var_input(tokens.float())
    with pytest.raises(TokenError, match="shape"):
        pq.tokens_to_fhat(tokens[:, :, :-1])
    with pytest.raises(TokenError, match="scale 1"):
        pq.quantizes[0].indices_to_fhat([torch.zeros(1, 1, dtype=torch.long), torch.full((1, 4), -1)] +
                                        [torch.zeros(1, pn * pn, dtype=torch.long) for pn in SMALL[2:]])
    with pytest.raises(TokenError, match="row 0, branch 0, scale 0"):
        pq.tokens_to_codes(torch.full((1, 2, 1), 99), 0)
    assert pq.tokens_to_fhat(tokens.numpy().clip(0, 63)).shape == (3, 16, 5, 5)


# ---- checkpoint layouts -----------------------------------------------------------------------------


def _layout(name: str, prefix: str) -> dict:
    data = json.loads((LAYOUTS / f"{name}.json").read_text())
    return {k: list(v) for k, v in data.items() if k.startswith(prefix)}


def _keys(module, prefix: str) -> dict:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "name,kw",
    [
        ("MSVR10P2-4096", dict(codebook_size=4096, dim=32, scales=S10, side=11)),
        ("MSBR10P2-4096", dict(codebook_size=4096, dim=12, scales=S10, side=11, lfq=True)),
        ("VP2-4096", dict(codebook_size=4096, dim=32, scales=(16,), side=16)),
    ],
)
def test_state_dict_matches_official_layout(name, kw):
    pq = ProductQuantizer([build_branch_quantizer(**kw) for _ in range(2)], codebook_drop=0.1, start_drop=3)
    assert _keys(pq, "") == _layout(name, "quantizes.")


def test_single_quantizer_matches_vq4096_layout():
    q = build_branch_quantizer(codebook_size=4096, dim=64, scales=(16,), side=16)
    assert isinstance(q, VectorQuantizer)
    assert _keys(q, "quantize.") == _layout("VQ-4096", "quantize.")
    assert isinstance(build_branch_quantizer(codebook_size=16, dim=4, scales=SMALL, side=5, lfq=True), MultiScaleLFQ)


# ---- RobustTok perturbation ---------------------------------------------------------------------------


def test_latent_perturbation_first_samples_and_schedule():
    from xqtool.quantize.perturb import perturb_latent, perturbation_schedule

    q = _make("vq").eval()
    z = torch.randn(4, 8, 6, 6, requires_grad=True)
    zq = q(z).quantized
    assert perturb_latent(q, z, zq, alpha=0.0, beta=0.5, delta=8) is zq
    out = perturb_latent(q, z, zq, alpha=1.0, beta=0.5, delta=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[2:], zq[2:])
    assert not torch.equal(out[:2], zq[:2])
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4, 6, 6))  # still codebook rows (unit)
    out.sum().backward()
    assert float(z.grad.abs().sum()) > 0
    assert perturbation_schedule(10, 1.0, 100, 40, 120, 0.5) == (1.0, 100)
    assert perturbation_schedule(80, 1.0, 100, 40, 120, 0.5) == (0.75, 75)
    assert perturbation_schedule(200, 1.0, 100, 40, 120, 0.3) == (0.3, 30)
