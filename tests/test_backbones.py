"""Backbones (CNN, DINOv2 ViT encoder/decoder), pos-embed resampling, pretrained loading and frozen teachers."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import LAYOUTS
from xqtool.errors import CheckpointError, ConfigError, WeightsMissingError
from xqtool.models.cnn import CNNDecoder, CNNEncoder, cnn_ch_mult
from xqtool.models.pos_embed import resample_pos_grid
from xqtool.checkpoints.pretrained import load_backbone_weights, load_vit_tokenizer_weights, weights_available
from xqtool.models.teachers import SemanticTeacher, teacher_weights_available
from xqtool.models.vit import ViTDecoder, ViTEncoder, build_vit_backbone, unpatchify

TINY = dict(embed_dim=64, depth=2, num_heads=2)
DINO = "vit_base_patch14_dinov2.lvd142m"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Point the HF hub cache and torch hub dir at empty folders and clear the weight env vars."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    for var in ("XQTOOL_DINOV2_WEIGHTS", "XQTOOL_CLIP_WEIGHTS", "XQTOOL_DINO_DISC_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _images(n: int, size: int) -> torch.Tensor:
    """Real photos (astronaut/chelsea/coffee crops) as [n, 3, size, size] in [-1, 1]."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    out = []
    for i in range(n):
        img = torch.from_numpy(photos[i % 3][:256, :256].copy()).permute(2, 0, 1).float() / 127.5 - 1
        if i >= 3:
            img = img.flip(-1)
        out.append(torch.nn.functional.interpolate(img[None], size=(size, size), mode="area")[0])
    return torch.stack(out)


def _nparams(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------- CNN


@pytest.mark.parametrize("vq_model,down", [("VQ-16", 16), ("VQ-8", 8)])
def test_cnn_shapes_and_names(vq_model, down):
    torch.manual_seed(0)
    mult = cnn_ch_mult(vq_model)
    enc = CNNEncoder(ch=8, ch_mult=mult, num_res_blocks=1, z_channels=4)
    dec = CNNDecoder(ch=8, ch_mult=mult, num_res_blocks=1, z_channels=4)
    x = _images(2, 32)
    z = enc(x)
    assert z.shape == (2, 4, 32 // down, 32 // down)
    y = dec(z)
    assert y.shape == (2, 3, 32, 32)
    assert dec.last_layer is dec.conv_out.weight
    last = len(mult) - 1
    ek, dk = set(enc.state_dict()), set(dec.state_dict())
    assert f"conv_blocks.{last}.attn.0.q.weight" in ek and "conv_blocks.0.attn.0.q.weight" not in ek
    assert "conv_blocks.0.downsample.conv.weight" in ek and f"conv_blocks.{last}.downsample.conv.weight" not in ek
    assert {"mid.0.conv1.weight", "mid.1.proj_out.weight", "mid.2.norm2.weight", "norm_out.weight"} <= ek
    # num_res_blocks + 1 = 2 res blocks per decoder level, attention only in the first (highest) level
    assert "conv_blocks.0.res.1.conv2.weight" in dk and "conv_blocks.0.res.2.conv2.weight" not in dk
    assert "conv_blocks.0.attn.1.k.weight" in dk and "conv_blocks.1.attn.0.k.weight" not in dk
    assert "conv_blocks.0.upsample.conv.weight" in dk and f"conv_blocks.{last}.upsample.conv.weight" not in dk
    # GroupNorm with fewer groups at tiny widths must divide the channels
    norm = enc.conv_blocks[0].res[0].norm1  # 8 channels
    assert norm.num_groups == 8 and norm.eps == 1e-6
    assert CNNEncoder(ch=12, ch_mult=(1, 2), num_res_blocks=1, z_channels=4).conv_in.out_channels == 12
    assert CNNEncoder(ch=12, ch_mult=(1, 2), num_res_blocks=1, z_channels=4).norm_out.num_groups == 24


def test_cnn_default_widths_meta():
    with torch.device("meta"):
        enc, dec = CNNEncoder(), CNNDecoder()
    widths = [lvl.res[-1].conv2.out_channels for lvl in enc.conv_blocks]
    assert widths == [128, 128, 256, 256, 512]
    assert enc.conv_blocks[1].res[0].nin_shortcut is None and enc.conv_blocks[2].res[0].nin_shortcut is not None
    assert enc.norm_out.num_groups == 32
    assert [lvl.res[-1].conv2.out_channels for lvl in dec.conv_blocks] == [512, 256, 256, 128, 128]
    assert dec.conv_in.in_channels == 256 and dec.conv_out.out_channels == 3


def test_cnn_unknown_factory():
    with pytest.raises(ConfigError, match="VQ-16"):
        cnn_ch_mult("VQ-32")


# ------------------------------------------------------------------------------------------------- pos resampling


def _spec_bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Spec §2.3: PIL-style antialiased bicubic (Keys a = -0.5) as a [n_out, n_in] matrix (float64)."""

    def cubic(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    s = n_in / n_out
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        c = (i + 0.5) * s
        lo = max(math.floor(c - 2 * s + 0.5), 0)
        hi = min(math.floor(c + 2 * s + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = cubic((j - c + 0.5) / s)
        w[i] /= w[i].sum()
    return w


def test_resample_pos_grid_matches_spec_formula():
    torch.manual_seed(0)
    pos = torch.randn(1, 256, 8)
    out = resample_pos_grid(pos, 11, 11)
    assert out.shape == (1, 121, 8)
    w = _spec_bicubic_matrix(16, 11)
    grid = pos[0].double().reshape(16, 16, 8)
    expected = torch.einsum("ai,ijc,bj->abc", w, grid, w).reshape(1, 121, 8)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    # a = -0.75 (non-PIL) would be visibly different: make sure the test can tell them apart
    assert not torch.allclose(out, torch.nn.functional.interpolate(
        pos.reshape(1, 16, 16, 8).permute(0, 3, 1, 2), size=(11, 11), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).reshape(1, 121, 8), atol=1e-4)
    assert resample_pos_grid(pos, 16, 16) is pos


# ----------------------------------------------------------------------------------------------------- ViT modules


def _tiny_pair(n_lat: int = 9, branches: int = 2):
    torch.manual_seed(0)
    enc = ViTEncoder(DINO, image_size=32, patch_size=4, num_latent_tokens=n_lat, num_branches=branches, **TINY)
    dec = ViTDecoder(DINO, image_size=32, patch_size=4, num_latent_tokens=n_lat, **TINY)
    # make the tiny init less degenerate so that token positions matter
    for m in (enc, dec):
        for p in (m.model.pos_embed, m.model.cls_token, m.lvl_embed.weight):
            torch.nn.init.normal_(p, std=0.5)
        for blk in m.model.blocks:  # LayerScale 1e-5 would make the blocks near-identity
            torch.nn.init.ones_(blk.ls1.gamma), torch.nn.init.ones_(blk.ls2.gamma)
    torch.nn.init.normal_(enc.latent_tokens, std=0.5)
    torch.nn.init.normal_(dec.mask_token, std=0.5)
    return enc.eval(), dec.eval()


def test_vit_shapes_properties_and_buffers():
    enc, dec = _tiny_pair(9, 2)
    x = _images(2, 32)
    z = enc(x)
    assert z.shape == (2, 18, 64)
    assert (enc.embed_dim, enc.num_latent_tokens, enc.grid) == (64, 9, 8)
    assert (dec.embed_dim, dec.num_latent_tokens, dec.grid) == (64, 9, 8)
    y = dec(z[:, 9:])
    assert y.shape == (2, 3, 32, 32)
    assert dec.last_layer is dec.to_pixel.model.weight and dec.last_layer.shape == (48, 64)
    # level ids: 64 patches + cls zeros, then 9 ones, 9 twos (encoder); 65 zeros, 10 ones (decoder)
    assert enc.lvl1LC.tolist() == [[0] * 65 + [1] * 9 + [2] * 9]
    assert dec.lvl1LC.tolist() == [[0] * 65 + [1] * 10]
    assert "lvl1LC" not in enc.state_dict() and "lvl1LC" not in dec.state_dict()
    assert enc.lvl_embed.num_embeddings == 3 and dec.lvl_embed.num_embeddings == 2
    assert not any("patch_embed" in k for k in dec.state_dict())
    assert any("patch_embed.proj" in k for k in enc.state_dict())
    p1 = ViTEncoder(DINO, image_size=32, patch_size=4, num_latent_tokens=4, num_branches=1, **TINY)
    assert p1.lvl_embed.num_embeddings == 2 and p1(x).shape == (2, 4, 64)
    with pytest.raises(ConfigError, match="perfect square"):
        ViTEncoder(DINO, image_size=32, patch_size=4, num_latent_tokens=10, **TINY)
    with pytest.raises(ConfigError, match="unknown timm model"):
        ViTEncoder("vit_nonexistent_model", image_size=32, patch_size=4, num_latent_tokens=4, **TINY)
    with pytest.raises(ConfigError, match="multiple"):
        ViTDecoder(DINO, image_size=30, patch_size=4, num_latent_tokens=4, **TINY)


def test_vit_other_image_size_and_no_abs_pos():
    torch.manual_seed(0)
    enc = ViTEncoder(DINO, image_size=48, patch_size=8, num_latent_tokens=4, num_branches=2, abs_pos_embed=False, **TINY)
    dec = ViTDecoder(DINO, image_size=48, patch_size=8, num_latent_tokens=4, abs_pos_embed=False, **TINY)
    assert enc.latent_pos_embed.shape == (1, 8, 64) and dec.latent_pos_embed.shape == (1, 4, 64)
    out = dec(enc(torch.randn(1, 3, 48, 48))[:, :4])
    assert out.shape == (1, 3, 48, 48) and torch.isfinite(out).all()


def _capture_block_input(model):
    seen = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    return seen, handle


def test_encoder_sequence_and_batch_broadcast_latents():
    enc, _ = _tiny_pair(9, 2)
    x = _images(2, 32)
    seen, handle = _capture_block_input(enc.model)
    with torch.no_grad():
        z = enc(x)
    handle.remove()
    seq = seen["x"]
    assert seq.shape == (2, 65 + 18, 64)
    m = enc.model
    lvl = enc.lvl_embed.weight
    # image part: cls + pos0, patch tokens + pos slots 1..64, all + lvl row 0
    with torch.no_grad():
        patches = m.patch_embed(x)
    torch.testing.assert_close(seq[:, 0], (m.cls_token[0, 0] + m.pos_embed[0, 0] + lvl[0]).expand(2, -1))
    torch.testing.assert_close(seq[:, 1:65], patches + m.pos_embed[:, 1:] + lvl[0])
    # latent part: identical for every image, latents + pos grid resampled 8x8 -> 3x3 + lvl row (branch + 1)
    torch.testing.assert_close(seq[0, 65:], seq[1, 65:])
    pos3 = resample_pos_grid(m.pos_embed[:, 1:], 3, 3)[0]
    lat = enc.latent_tokens[0]
    torch.testing.assert_close(seq[0, 65:74], lat[:9] + pos3 + lvl[1])
    torch.testing.assert_close(seq[0, 74:83], lat[9:] + pos3 + lvl[2])
    # two different images -> different latent outputs
    assert (z[0] - z[1]).abs().max() > 1e-3


def test_decoder_sequence_layout():
    _, dec = _tiny_pair(9, 2)
    torch.manual_seed(1)
    zin = torch.randn(2, 9, 64)
    seen, handle = _capture_block_input(dec.model)
    with torch.no_grad():
        dec(zin)
    handle.remove()
    seq = seen["x"]
    m, lvl = dec.model, dec.lvl_embed.weight
    assert seq.shape == (2, 65 + 1 + 9, 64)
    cls = m.cls_token[0, 0] + m.pos_embed[0, 0]
    torch.testing.assert_close(seq[:, 0], (cls + lvl[0]).expand(2, -1))
    torch.testing.assert_close(seq[:, 1:65], (dec.mask_token[0] + m.pos_embed[0, 1:] + lvl[0]).expand(2, -1, -1))
    torch.testing.assert_close(seq[:, 65], (cls + lvl[1]).expand(2, -1))
    pos3 = resample_pos_grid(m.pos_embed[:, 1:], 3, 3)
    torch.testing.assert_close(seq[:, 66:], zin + pos3 + lvl[1])


def test_unpatchify_mapping_by_hand():
    b, g, p, c = 2, 3, 4, 3
    tok = torch.arange(b * g * g * p * p * c, dtype=torch.float32).reshape(b, g * g, p * p * c)
    img = unpatchify(tok, p)
    assert img.shape == (b, c, g * p, g * p)
    for bi in range(b):
        for ch in range(c):
            for i in range(g):
                for j in range(g):
                    for u in range(p):
                        for v in range(p):
                            assert img[bi, ch, p * i + u, p * j + v] == tok[bi, i * g + j, (u * p + v) * c + ch]


def test_decoder_uses_image_positions_and_unpatchify():
    _, dec = _tiny_pair(9, 2)
    coded = torch.arange(2 * 64 * 48, dtype=torch.float32).reshape(2, 64, 48)
    got = {}

    def replace(mod, args, out):
        got["in"] = args[0]
        return coded

    handle = dec.to_pixel.register_forward_hook(replace)
    with torch.no_grad():
        img = dec(torch.randn(2, 9, 64))
    handle.remove()
    assert got["in"].shape == (2, 64, 64)  # the 64 image positions (1..64), not cls / latents
    assert img[1, 2, 4 * 5 + 3, 4 * 6 + 1] == coded[1, 5 * 8 + 6, (3 * 4 + 1) * 3 + 2]
    torch.testing.assert_close(img, unpatchify(coded, 4))


def test_gradients_flow_through_encoder_and_decoder():
    enc, dec = _tiny_pair(4, 1)
    enc.train(), dec.train()
    x = _images(2, 32)
    loss = (dec(enc(x)) - x).pow(2).mean()
    loss.backward()
    for name, p in [
        ("latent_tokens", enc.latent_tokens), ("patch_embed", enc.model.patch_embed.proj.weight),
        ("enc pos_embed", enc.model.pos_embed), ("enc block", enc.model.blocks[0].attn.qkv.weight),
        ("mask_token", dec.mask_token), ("dec lvl", dec.lvl_embed.weight), ("to_pixel", dec.last_layer),
        ("dec block", dec.model.blocks[-1].mlp.fc2.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_autocast_bf16_cpu():
    enc, dec = _tiny_pair(4, 1)
    seen, handle = _capture_block_input(enc.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = enc.train()(_images(1, 32))
        assert seen.pop("x").dtype == torch.bfloat16  # training: the fp32 insertion region is cast to autocast dtype
        z = enc.eval()(_images(1, 32))
        assert seen["x"].dtype == torch.float32  # inference keeps the residual stream fp32 (closer tokens)
        y = dec.eval()(z)
    handle.remove()
    assert z.shape == (1, 4, 64) and y.shape == (1, 3, 32, 32) and torch.isfinite(y.float()).all()


# ------------------------------------------------------------------------------------- official layouts (meta)

_QUANT_PARAMS = 2 * (4096 * 32 + 4 * (32 * 32 * 9 + 32))


@pytest.mark.parametrize("layout,branches,n_lat", [("MSVR10P2-4096", 2, 121), ("VP2-4096", 2, 256), ("VQ-4096", 1, 256)])
def test_layouts_match_official_keys(layout, branches, n_lat):
    ref = json.loads((LAYOUTS / f"{layout}.json").read_text())
    with torch.device("meta"):
        enc = ViTEncoder(DINO, image_size=256, patch_size=16, num_latent_tokens=n_lat, num_branches=branches)
        dec = ViTDecoder(DINO, image_size=256, patch_size=16, num_latent_tokens=n_lat)
    mine = {f"encoder.{k}": list(v.shape) for k, v in enc.state_dict().items()}
    mine.update({f"decoder.{k}": list(v.shape) for k, v in dec.state_dict().items()})
    want = {k: v for k, v in ref.items() if k.startswith(("encoder.", "decoder.")) and not k.endswith("lvl1LC")}
    assert set(mine) == set(want)
    assert {k: v for k, v in mine.items() if want[k] != v} == {}
    # the recomputed level ids have the official length
    assert list(enc.lvl1LC.shape) == ref["encoder.lvl1LC"] and list(dec.lvl1LC.shape) == ref["decoder.lvl1LC"]


def test_full_tokenizer_param_count_meta():
    with torch.device("meta"):
        enc = ViTEncoder(DINO, image_size=256, patch_size=16, num_latent_tokens=121, num_branches=2)
        dec = ViTDecoder(DINO, image_size=256, patch_size=16, num_latent_tokens=121)
        quant_conv = torch.nn.Conv2d(768, 32, 1)
        post_quant_conv = torch.nn.Conv2d(64, 768, 1)
    assert _nparams(quant_conv) == 24_608 and _nparams(post_quant_conv) == 49_920
    assert _nparams(enc, dec, quant_conv, post_quant_conv) + _QUANT_PARAMS == 172_327_456


# ------------------------------------------------------------------------------------------- pretrained loading


def test_load_same_shape_safetensors_pth_and_dir(tmp_path, empty_caches, monkeypatch):
    torch.manual_seed(0)
    src = build_vit_backbone(DINO, 32, 4, **TINY)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    (tmp_path / "d").mkdir()
    save_file(sd, str(tmp_path / "d" / "model.safetensors"))
    for source in (tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "d"):
        dst = build_vit_backbone(DINO, 32, 4, **TINY)
        used = load_backbone_weights(dst, source, kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
        assert Path(used).is_file()
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # env var route
    monkeypatch.setenv("XQTOOL_DINOV2_WEIGHTS", str(tmp_path / "w.pth"))
    dst = build_vit_backbone(DINO, 32, 4, **TINY)
    load_backbone_weights(dst, None, kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    assert torch.equal(dst.pos_embed, sd["pos_embed"])
    # a ViT decoder backbone (no patch embedding) takes the same file
    dec = ViTDecoder(DINO, image_size=32, patch_size=4, num_latent_tokens=4, **TINY)
    load_vit_tokenizer_weights(dec, tmp_path / "w.pth", config_key="model.decoder_weights")
    assert torch.equal(dec.model.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])


def test_load_resamples_patch14_to_patch16(tmp_path, empty_caches):
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    torch.manual_seed(0)
    src = build_vit_backbone(DINO, 70, 14, **TINY)  # 5x5 grid, patch 14 (like 37x37 DINOv2)
    sd = src.state_dict()
    torch.save(sd, tmp_path / "dinov2_p14.pth")
    dst = build_vit_backbone(DINO, 64, 16, **TINY)  # 4x4 grid, patch 16
    load_backbone_weights(dst, tmp_path / "dinov2_p14.pth", kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    assert dst.pos_embed.shape == (1, 17, 64) and dst.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    want_pos = resample_abs_pos_embed(sd["pos_embed"], new_size=(4, 4), old_size=(5, 5), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    torch.testing.assert_close(dst.pos_embed.detach(), want_pos)
    torch.testing.assert_close(dst.pos_embed[:, 0].detach(), sd["pos_embed"][:, 0])  # cls slot kept
    want_w = resample_patch_embed(sd["patch_embed.proj.weight"], (16, 16), interpolation="bicubic", antialias=True)
    torch.testing.assert_close(dst.patch_embed.proj.weight.detach(), want_w)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    # original (facebookresearch) DINOv2 layout carries a mask_token; the decoder backbone drops the patch kernel
    torch.save({**sd, "mask_token": torch.zeros(1, 64)}, tmp_path / "dinov2_fb.pth")
    dec = ViTDecoder(DINO, image_size=64, patch_size=16, num_latent_tokens=4, **TINY)
    load_backbone_weights(dec.model, tmp_path / "dinov2_fb.pth", kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    torch.testing.assert_close(dec.model.pos_embed.detach(), want_pos)


def test_load_from_local_hub_cache(tmp_path, empty_caches):
    torch.manual_seed(0)
    src = build_vit_backbone(DINO, 32, 4, **TINY)
    snap = tmp_path / "hf" / "models--timm--vit_base_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    assert teacher_weights_available("dinov2")
    dst = build_vit_backbone(DINO, 32, 4, **TINY)
    used = load_backbone_weights(dst, None, kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    assert Path(used) == snap / "model.safetensors"
    assert torch.equal(dst.cls_token, src.cls_token)


def test_missing_and_bad_weights_errors(tmp_path, empty_caches, monkeypatch):
    model = build_vit_backbone(DINO, 32, 4, **TINY)
    with pytest.raises(WeightsMissingError) as info:
        load_backbone_weights(model, None, kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    assert str(info.value) == (
        "DINOv2 weights for 'vit_base_patch14_dinov2.lvd142m' not found: pass --set model.encoder_weights=PATH "
        "or set XQTOOL_DINOV2_WEIGHTS=PATH (a timm .pth/.safetensors file)"
    )
    assert not weights_available(None, env_var="XQTOOL_DINOV2_WEIGHTS", model_name=DINO)
    assert not weights_available(tmp_path / "nope.pth", env_var="XQTOOL_DINOV2_WEIGHTS")
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    assert weights_available(tmp_path / "ok.pth", env_var="XQTOOL_DINOV2_WEIGHTS")
    with pytest.raises(WeightsMissingError, match="does not exist"):
        load_backbone_weights(model, tmp_path / "nope.pth", kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    monkeypatch.setenv("XQTOOL_DINOV2_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsMissingError, match="XQTOOL_DINOV2_WEIGHTS"):
        load_backbone_weights(model, None, kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    other = build_vit_backbone(DINO, 32, 4, embed_dim=32, depth=2, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_backbone_weights(model, tmp_path / "other.pth", kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_backbone_weights(model, tmp_path / "junk.pth", kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS")


# ------------------------------------------------------------------------------------------------------ teachers


def test_teachers_missing_weights(empty_caches):
    assert not teacher_weights_available("dinov2") and not teacher_weights_available("clip")
    with pytest.raises(WeightsMissingError, match="XQTOOL_DINOV2_WEIGHTS"):
        SemanticTeacher("dinov2", image_size=32, patch_size=4, **TINY)
    with pytest.raises(WeightsMissingError, match="XQTOOL_CLIP_WEIGHTS"):
        SemanticTeacher("clip", image_size=32, patch_size=4, **TINY)
    with pytest.raises(ConfigError):
        SemanticTeacher("sam", image_size=32, patch_size=4, **TINY)


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_teacher_frozen_and_normalised(kind, tmp_path, empty_caches, monkeypatch):
    torch.manual_seed(0)
    ref = SemanticTeacher(kind, image_size=32, patch_size=4, allow_random=True, **TINY)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(path))
    env = "XQTOOL_DINOV2_WEIGHTS" if kind == "dinov2" else "XQTOOL_CLIP_WEIGHTS"
    monkeypatch.setenv(env, str(path))
    assert teacher_weights_available(kind)
    teacher = SemanticTeacher(kind, image_size=32, patch_size=4, **TINY)
    assert teacher.weights_path == str(path)
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = _images(2, 32).requires_grad_(True)
    out = teacher(x)
    assert out["cls"].shape == (2, 64) and out["patches"].shape == (2, 64, 64)
    assert not out["cls"].requires_grad
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = ref.model.forward_features(((x + 1) / 2 - mean) / std)
    torch.testing.assert_close(out["cls"], feats[:, 0])
    torch.testing.assert_close(out["patches"], feats[:, 1:])
