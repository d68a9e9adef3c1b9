"""VAR transformer: parameter count and layout, mask, init, checkpoints, sampling (KV cache, seeds, CFG, filters)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import LAYOUTS
from xqtool.config import VARModelConfig, var_preset
from xqtool.errors import CheckpointError
from xqtool.metrics import count_parameters
from xqtool.models.var import VAR, build_var, level_index
from xqtool.models.var_sampling import (cfg_weight, guide_logits, sample_tokens, top_k_filter, top_p_filter)
from xqtool.quantize.factory import build_branch_quantizer
from xqtool.quantize.product import ProductQuantizer
from xqtool.checkpoints import load_var, save_var

LAYOUT = LAYOUTS / "VAR-d17-MSVR10P2-4096.json"
DERIVED = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
SCALES = (1, 1, 2, 3)  # repeated first scale, like MSVR's 1,1 and 3,3


def tiny_cfg(**kw) -> VARModelConfig:
    base = dict(depth=2, width=64, num_heads=2, num_classes=10, patch_nums=SCALES, codebook_size=16,
                num_branches=2, branch_dim=4, cond_drop_rate=0.1)
    base.update(kw)
    return VARModelConfig(**base)


def tiny_pq(cfg: VARModelConfig) -> ProductQuantizer:
    torch.manual_seed(1)
    branches = [build_branch_quantizer(codebook_size=cfg.codebook_size, dim=cfg.branch_dim,
                                       scales=cfg.patch_nums, side=cfg.patch_nums[-1])
                for _ in range(cfg.num_branches)]
    return ProductQuantizer(branches).eval()


def randomize(model: VAR, seed: int = 0) -> VAR:
    """Give every parameter O(1) random values so that all paths (gammas, head) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def random_tokens(cfg: VARModelConfig, b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (b, cfg.num_branches, cfg.seq_len), generator=g)


# ------------------------------------------------------------------------------------------ size / layout
def test_d17_parameter_count_on_meta() -> None:
    m = build_var("d17", device="meta")
    assert count_parameters(m) == 375_258_593
    assert count_parameters(m, "blocks.") == 362_484_897
    assert m.C == 1088 and m.num_heads == 17 and m.L == 286 and m.V == 8192 and m.Cvae == 64
    assert math.isclose(m.config.dpr, 0.1 * 17 / 24)
    for name, depth in (("d16", 16), ("d20", 20), ("d24", 24), ("d30", 30)):
        cfg = var_preset(name)
        assert (cfg.embed_dim, cfg.heads) == (64 * depth, depth)


def test_d17_state_dict_layout_matches_spec() -> None:
    layout = json.loads(LAYOUT.read_text())
    expected = {k: v for k, v in layout.items() if not k.endswith(DERIVED)}
    sd = build_var("d17", device="meta").state_dict()
    assert set(sd) == set(expected)
    assert all(list(sd[k].shape) == expected[k] for k in sd)


def test_level_index_tells_repeated_scales_apart() -> None:
    lvl = level_index((1, 1, 2, 3, 3)).tolist()
    assert lvl == [0, 1] + [2] * 4 + [3] * 9 + [4] * 9


def _official_d17_file(path: Path, drop: str = "", extra: str = "", bad_shape: str = "") -> None:
    layout = json.loads(LAYOUT.read_text())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in layout.items():
        if k == drop:
            continue
        if k == bad_shape:
            shape = [s + 1 for s in shape]
        if k == "lvl_1L":
            sd[k] = torch.zeros(shape, dtype=torch.long)
        else:  # random value, stride-0 storage: the file stays small
            sd[k] = torch.randn(1, generator=g).expand(*shape)
    if extra:
        sd[extra] = torch.zeros(3)
    ckpt = {"epoch": 350, "iter": 0, "args": {"depth": 17, "pn": "1_1_2_3_3_4_5_6_8_11", "product_quant": 2},
            "trainer": {"config": {"patch_nums": [1, 1, 2, 3, 3, 4, 5, 6, 8, 11]}, "var_wo_ddp": sd,
                        "vae_local": {"quantizes.0.embedding.weight": torch.zeros(1).expand(4096, 32)},
                        "var_opt": {"optimizer": {"state": {}, "param_groups": []}}}}
    torch.save(ckpt, path)


def test_official_d17_layout_loads_and_mismatch_is_clear(tmp_path: Path) -> None:
    good = tmp_path / "ar-ckpt-last.pth"
    _official_d17_file(good)
    model, info = load_var(good, device="meta")
    assert info["format"] == "official" and model.patch_nums == (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
    assert count_parameters(model) == 375_258_593 and model.depth == 17

    missing = tmp_path / "missing.pth"
    _official_d17_file(missing, drop="blocks.3.ffn.fc2.bias")
    with pytest.raises(CheckpointError, match="missing 1 .*blocks.3.ffn.fc2.bias"):
        load_var(missing, device="meta")
    unexpected = tmp_path / "unexpected.pth"
    _official_d17_file(unexpected, extra="blocks.0.attn.foo")
    with pytest.raises(CheckpointError, match="unexpected 1 .*blocks.0.attn.foo"):
        load_var(unexpected, device="meta")
    shape = tmp_path / "shape.pth"
    _official_d17_file(shape, bad_shape="blocks.2.attn.proj.bias")
    with pytest.raises(CheckpointError, match="blocks.2.attn.proj.bias"):
        load_var(shape, device="meta")
    with pytest.raises(CheckpointError, match="not found"):
        load_var(tmp_path / "nope.pth")


def test_official_small_file_round_trip_and_own_format(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = randomize(VAR(cfg))
    pq = tiny_pq(cfg)
    tokens = random_tokens(cfg, 3)
    labels = torch.tensor([1, 2, 10])
    x = pq.var_input(tokens)
    ref = model(labels, x, drop_cond=False)
    sd = dict(model.state_dict())
    L = cfg.seq_len
    sd["lvl_1L"] = level_index(cfg.patch_nums).view(1, L)
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, 16, 16)  # xformers-padded shape: ignored
    for i in range(cfg.depth):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(cfg.embed_dim)
    path = tmp_path / "var_d2.pth"
    torch.save({"trainer": {"var_wo_ddp": sd, "config": {"patch_nums": list(cfg.patch_nums)}},
                "args": {"product_quant": 2}}, path)
    loaded, _ = load_var(path)
    assert torch.equal(loaded(labels, x, drop_cond=False), ref)

    own = save_var(tmp_path / "own", model, extra_config={"tokenizer": {"hash": "abc"}})
    assert sorted(p.name for p in own.iterdir()) == ["config.yaml", "model.safetensors"]
    again, info = load_var(own)
    assert info["format"] == "xqtool" and info["config"]["tokenizer"]["hash"] == "abc"
    assert torch.equal(again(labels, x, drop_cond=False), ref)


# ------------------------------------------------------------------------------------------ init / mask / drop
def test_initialisation_follows_spec() -> None:
    cfg = tiny_cfg(depth=3, width=96, num_heads=3)
    m = VAR(cfg)
    c, std = 96, math.sqrt(1 / 96 / 3)
    assert m.init_std == pytest.approx(std)
    blk = m.blocks[0]
    w = blk.ada_lin[1].weight
    assert w[2 * c:].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert w[: 2 * c].std().item() == pytest.approx(std * 1e-5, rel=0.1)
    assert torch.all(blk.ada_lin[1].bias == 0) and torch.all(blk.attn.q_bias == 0)
    assert torch.allclose(blk.attn.scale_mul_1H11, torch.full_like(blk.attn.scale_mul_1H11, math.log(4)))
    assert blk.attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(6), rel=0.1)
    assert m.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.1)
    assert torch.all(m.head.bias == 0)
    assert "zero_k_bias" not in "".join(m.state_dict())


def test_block_causal_mask_hides_later_scales() -> None:
    cfg = tiny_cfg()
    model = randomize(VAR(cfg))
    labels = torch.tensor([3, 4])
    x = torch.randn(2, cfg.seq_len - 1, cfg.cvae)
    base = model(labels, x, drop_cond=False)
    begin_ends = model.begin_ends
    for si in range(1, model.num_scales):
        b, e = begin_ends[si]
        x2 = x.clone()
        x2[:, b - 1:e - 1] += 5 * torch.randn_like(x2[:, b - 1:e - 1])  # inputs of scale si only
        out = model(labels, x2, drop_cond=False)
        assert torch.allclose(out[:, :b], base[:, :b], atol=1e-5), f"scale {si} leaked into earlier scales"
        assert not torch.allclose(out[:, b:e], base[:, b:e], atol=1e-3)  # full attention inside the scale


def test_condition_dropout_flag_and_upstream_mode() -> None:
    cfg = tiny_cfg(cond_drop_rate=0.5)
    model = randomize(VAR(cfg))
    labels = torch.arange(8) % 10
    x = torch.randn(8, cfg.seq_len - 1, cfg.cvae)
    model.eval()
    assert torch.equal(model(labels, x), model(labels, x))  # eval: no drop by default
    torch.manual_seed(5)
    upstream = model(labels, x, drop_cond=True)  # upstream: global RNG, first draw of the forward
    torch.manual_seed(5)
    u = torch.rand(8)
    dropped = torch.where(u < 0.5, torch.tensor(10), labels)
    assert 0 < int((dropped == 10).sum()) < 8
    assert torch.allclose(upstream, model(dropped, x, drop_cond=False), atol=1e-6)


# ------------------------------------------------------------------------------------------ filters / cfg
def test_filters_follow_upstream_rules() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True, True]]  # ties survive
    assert torch.equal(top_k_filter(logits, 0), logits)
    probs = torch.tensor([[0.05, 0.1, 0.15, 0.3, 0.4]]).log()
    kept = ~torch.isinf(top_p_filter(probs, 0.7))
    # ascending cumsum 0.05, 0.15, 0.30, 0.60, 1.0; remove where <= 0.3
    assert kept.tolist() == [[False, False, False, True, True]]
    assert torch.equal(top_p_filter(probs, 0.0), probs)
    assert (~torch.isinf(top_p_filter(probs, 1e-6))).sum() == 1  # the largest is always kept
    pair = torch.randn(4, 3, 7)
    assert torch.equal(guide_logits(pair, 0.0), pair[:2])
    assert torch.allclose(guide_logits(pair, 2.0), 3 * pair[:2] - 2 * pair[2:])
    assert cfg_weight(3.25, 0, 10) == 0 and cfg_weight(3.25, 9, 10) == 3.25


# ------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def tiny_setup():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    return cfg, randomize(VAR(cfg)), tiny_pq(cfg)


def test_kv_cache_sampling_equals_full_recomputation(tiny_setup) -> None:
    cfg, model, pq = tiny_setup
    labels = torch.tensor([1, 5, 7])
    kw = dict(cfg=2.0, top_k=8, top_p=0.9)
    a = sample_tokens(model, pq, labels, seeds=[10, 11, 12], use_cache=True, **kw)
    b = sample_tokens(model, pq, labels, seeds=[10, 11, 12], use_cache=False, **kw)
    assert a.tokens.shape == (3, 2, cfg.seq_len)
    assert torch.equal(a.tokens, b.tokens)
    ga = sample_tokens(model, pq, labels, generator=torch.Generator().manual_seed(3), **kw)
    gb = sample_tokens(model, pq, labels, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(ga.tokens, gb.tokens)
    other = sample_tokens(model, pq, labels, seeds=[20, 21, 22], **kw)
    assert not torch.equal(a.tokens, other.tokens)


def test_per_image_seeds_make_batch_size_irrelevant(tiny_setup) -> None:
    cfg, model, pq = tiny_setup
    labels = torch.tensor([0, 3, 3, 9])
    seeds = [100, 101, 102, 103]
    full = sample_tokens(model, pq, labels, seeds=seeds, cfg=1.5, top_k=10, top_p=0.95)
    ones = [sample_tokens(model, pq, labels[i:i + 1], seeds=seeds[i:i + 1], cfg=1.5, top_k=10, top_p=0.95)
            for i in range(4)]
    assert torch.equal(full.tokens, torch.cat([o.tokens for o in ones]))
    assert torch.allclose(full.f_hat, torch.cat([o.f_hat for o in ones]), atol=1e-6)


def test_cfg0_gives_conditional_logits_and_top_k1_is_greedy(tiny_setup) -> None:
    cfg, model, pq = tiny_setup
    labels = torch.tensor([2, 6])
    seen = {}
    out = sample_tokens(model, pq, labels, seeds=[1, 2], cfg=0.0, top_k=1, top_p=0.0,
                        logits_hook=lambda si, lg: seen.__setitem__(si, lg.clone()))
    # teacher forcing on the sampled tokens (no label drop) gives the same logits as the cfg-0 sampling
    tf = model(labels, pq.var_input(out.tokens), drop_cond=False)
    sampled_logits = torch.cat([seen[si] for si in range(model.num_scales)], dim=1)
    assert torch.allclose(sampled_logits, tf, atol=1e-4)
    # top-k 1 = greedy: every token is the argmax of its branch's logits
    greedy = tf.view(2, cfg.seq_len, cfg.num_branches, cfg.codebook_size).argmax(-1).transpose(1, 2)
    assert torch.equal(out.tokens, greedy)
    # with guidance the guided logits differ from the conditional ones after the first scale
    seen.clear()
    sample_tokens(model, pq, labels, seeds=[1, 2], cfg=4.0, top_k=1, top_p=0.0,
                  logits_hook=lambda si, lg: seen.__setitem__(si, lg.clone()))
    assert not torch.allclose(seen[model.num_scales - 1], sampled_logits[:, -9:], atol=1e-3)


def test_bf16_autocast_sampling_runs(tiny_setup) -> None:
    cfg, model, pq = tiny_setup
    out = sample_tokens(model, pq, 4, batch_size=2, seeds=[0, 1], cfg=3.25, top_k=5, top_p=0.95,
                        amp_dtype=torch.bfloat16)
    assert out.tokens.shape == (2, 2, cfg.seq_len)
    assert int(out.tokens.max()) < cfg.codebook_size and torch.isfinite(out.f_hat).all()


def test_preallocated_kv_cache_matches_concatenation() -> None:
    from xqtool.models.var import KVCache

    g = torch.Generator().manual_seed(0)
    grow, pre = KVCache(1), KVCache(1, capacity=6)
    for t in (1, 2, 3):
        k, v = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g)
        ka, va = grow.extend(0, k, v)
        kb, vb = pre.extend(0, k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert pre.length == grow.length == 6
    with pytest.raises(ValueError, match="capacity"):
        pre.extend(0, k, v)


def test_bf16_sampling_restores_fp32_weights(tiny_setup) -> None:
    cfg, model, pq = tiny_setup
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    sample_tokens(model, pq, 4, batch_size=1, seeds=[0], top_k=5, amp_dtype=torch.bfloat16)
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_candidate_sampling_is_the_filtered_distribution() -> None:
    from xqtool.models.var_sampling import filter_logits, filtered_candidates

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 2, 64, generator=g) * 3
    for k, p, temp in [(10, 0.9, 1.0), (0, 0.8, 1.0), (7, 0.0, 0.7), (0, 0.0, 1.0), (64, 0.5, 1.3)]:
        probs, ids = filtered_candidates(logits, k, p, temp)
        full = torch.zeros_like(logits) if ids is not None else probs
        if ids is not None:
            full.scatter_(-1, ids, probs)
        want = filter_logits(logits, k, p, temp).softmax(-1)
        assert torch.allclose(full, want, atol=1e-6), (k, p, temp)
        assert torch.equal(full > 0, want > 0), (k, p, temp)  # the same survivors
    # a tie at the k-th value keeps every tied logit, like top_k_filter
    tied = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    probs, ids = filtered_candidates(tied, 2, 0.0)
    full = torch.zeros_like(tied).scatter_(-1, ids, probs)
    assert (full > 0).tolist() == [[False, True, True, True, False]]
    flat = torch.zeros(1, 100)
    flat[0, :2] = 5.0  # the 3rd value ties with 98 others: more than the spare candidate columns
    probs, ids = filtered_candidates(flat, 3, 0.0)
    assert int((torch.zeros_like(flat).scatter_(-1, ids, probs) > 0).sum()) == 100
    rows = torch.stack([tied[0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])])  # one row tied, one not
    probs, ids = filtered_candidates(rows, 2, 0.0)
    full = torch.zeros_like(rows).scatter_(-1, ids, probs)
    assert torch.equal(full > 0, top_k_filter(rows, 2) > float("-inf"))


# ------------------------------------------------------------------------------------------ packed linears
def test_packed_linears_match_plain_and_leave_no_trace(tiny_setup, monkeypatch) -> None:
    cfg, model, pq = tiny_setup
    labels, x = torch.tensor([1, 4]), pq.var_input(random_tokens(cfg, 2))
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model(labels, x, drop_cond=False)
        with model.packed_linears() as active:
            if not active:
                pytest.skip("oneDNN packed linears are not available in this torch build")
            assert model.packed_dtype == torch.float32 and model.blocks[0].ffn.packed is not None
            packed = model(labels, x, drop_cond=False)
            assert list(model.state_dict()) == keys  # derived tensors never enter the state dict
    assert torch.allclose(packed, plain, atol=1e-5)
    assert model.packed_dtype is None and model.packed_head is None
    assert all(b.attn.packed is None and b.ffn.packed is None for b in model.blocks)
    # with autograd on, the packed path is bypassed and gradients reach the parameters
    with model.packed_linears():
        model.zero_grad()
        model(labels, x, drop_cond=False).square().mean().backward()
        assert model.blocks[0].ffn.fc1.weight.grad is not None
        model.zero_grad()
    # sampling inside the context: fp32 only, and batch-size independent like the plain path
    seeds, lab4 = [5, 6, 7, 8], torch.tensor([0, 3, 3, 9])
    with model.packed_linears():
        full = sample_tokens(model, pq, lab4, seeds=seeds, cfg=1.5, top_k=10, top_p=0.95)
        ones = [sample_tokens(model, pq, lab4[i:i + 1], seeds=seeds[i:i + 1], cfg=1.5, top_k=10, top_p=0.95)
                for i in range(4)]
        cached = sample_tokens(model, pq, lab4, seeds=seeds, cfg=1.5, top_k=10, top_p=0.95)
        recomputed = sample_tokens(model, pq, lab4, seeds=seeds, cfg=1.5, top_k=10, top_p=0.95, use_cache=False)
        assert torch.equal(cached.tokens, recomputed.tokens)
        with pytest.raises(ValueError, match="packed for torch.float32"):
            sample_tokens(model, pq, lab4, seeds=seeds, amp_dtype=torch.bfloat16)
    assert torch.equal(full.tokens, torch.cat([o.tokens for o in ones]))
    # where oneDNN is missing the context is a no-op that says so
    import xqtool.models.var as var_module

    monkeypatch.setattr(var_module, "packing_available", lambda device, dtype: False)
    with model.packed_linears() as active:
        assert active is False and model.packed_dtype is None


def test_packed_linear_fuses_gelu_and_rejects_unknown_activation() -> None:
    from xqtool.models.packed_linear import PackedLinear, packing_available

    if not packing_available(torch.device("cpu")):
        pytest.skip("oneDNN packed linears are not available in this torch build")
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 32, generator=g), torch.randn(48, generator=g), torch.randn(2, 5, 32, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    assert torch.allclose(PackedLinear(w, b)(x), ref, atol=1e-4)
    assert torch.allclose(PackedLinear(w, b, "gelu_tanh")(x), torch.nn.functional.gelu(ref, approximate="tanh"),
                          atol=1e-4)
    assert PackedLinear(w, b, dtype=torch.bfloat16)(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown fused activation"):
        PackedLinear(w, b, "relu6")
