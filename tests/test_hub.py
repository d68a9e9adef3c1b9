"""Model registry and Hub references, offline: a hand-built huggingface_hub cache, HF_HUB_OFFLINE=1, no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from _hub_fixtures import add_hub_file, official_tokenizer_bytes, official_var_bytes
from conftest import ROOT
from xqtool.checkpoints import load_tokenizer, save_tokenizer
from xqtool.errors import CheckpointError
from xqtool.hub import ModelNotCachedError, find_model, list_models, parse_reference
from xqtool.models.tokenizer import build_tokenizer
from xqtool.checkpoints import load_var

REPO = "qiuk6/XQ-GAN"
C_MAIN = "a" * 40
C_OLD = "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Empty Hub cache under HF_HOME=tmp, offline."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XQTOOL_REGISTRY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


@pytest.fixture
def msvr_cached(hub, tiny_cnn_cfg):
    """MSVR10P2-4096/best_ckpt.pt in the cache: revision main (seed 0) and tag v1 at an older commit (seed 1)."""
    data_main, state_main = official_tokenizer_bytes(tiny_cnn_cfg, seed=0)
    data_old, state_old = official_tokenizer_bytes(tiny_cnn_cfg, seed=1)
    blob = add_hub_file(hub, REPO, "MSVR10P2-4096/best_ckpt.pt", data_main, commit=C_MAIN, refs=("main",))
    add_hub_file(hub, REPO, "MSVR10P2-4096/best_ckpt.pt", data_old, commit=C_OLD, refs=("v1",))
    return {"blob": blob, "main": state_main, "old": state_old}


def _same(tok, state) -> bool:
    return torch.equal(tok.quant_conv.weight, state["quant_conv.weight"])


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_the_published_zoo_with_readme_facts() -> None:
    entries = {e.name: e for e in list_models()}
    expected_files = {  # the upstream README's download links
        "VP2-4096": "vq-4096/best_ckpt.pt", "VP2-16384": "vq-16384/best_ckpt.pt",
        "MSBR10P2-4096": "MSBR10P2-4096/best_ckpt.pt", "MSBR10P2-16384": "MSBR10P2-16384/best_ckpt.pt",
        "MSVR10P2-4096": "MSVR10P2-4096/best_ckpt.pt", "MSVR10P2-8192": "MSVR10P2-8192/best_ckpt.pt",
        "MSVR10P2-16384": "MSVR10P2-16384/best_ckpt.pt", "IMed-MSVR10P2-4096": "IMed-MSVR10P2-4096/IMed361M.pt",
        "LAION-MSVR10P2-4096": "LAION-MSVR10P2-4096/laion.pt", "VAR-d17": "VAR-d17-MSVR10P2-4096/ar-ckpt-last.pth",
    }
    assert {n: e.file for n, e in entries.items()} == expected_files
    assert all(e.repo == REPO and e.licence == "unknown" for e in entries.values())
    rfid = {"VP2-4096": 0.90, "VP2-16384": 0.64, "MSBR10P2-4096": 0.86, "MSBR10P2-16384": 0.78,
            "MSVR10P2-4096": 0.80, "MSVR10P2-8192": 0.70, "MSVR10P2-16384": 0.67}
    assert {n: e.metric["rFID"] for n, e in entries.items() if e.metric and "rFID" in e.metric} == rfid
    assert entries["VAR-d17"].metric == {"gFID": 2.60} and entries["VAR-d17"].kind == "var"
    assert entries["IMed-MSVR10P2-4096"].metric is None and entries["LAION-MSVR10P2-4096"].metric is None
    # tokens per image by hand: 2 branches x (1+1+4+9+9+16+25+36+64+121) = 2 x 286; VP2: 2 x 16*16
    assert entries["MSVR10P2-4096"].tokens_per_image == 572 and entries["VP2-16384"].tokens_per_image == 512
    for e in entries.values():  # every tokenizer names a config that exists
        if e.kind == "tokenizer":
            assert (ROOT / "configs" / "tokenizer" / f"{e.config}.yaml").is_file(), e.name
    assert (ROOT / "configs" / "var" / f"{entries['VAR-d17'].config}.yaml").is_file()
    assert find_model("msvr10p2-4096").name == "MSVR10P2-4096"
    assert find_model("VAR-d17-MSVR10P2-4096").name == "VAR-d17"


def test_reference_syntax() -> None:
    r = parse_reference("hf://me/repo/sub/best.pt@v2")
    assert (r.repo, r.path, r.revision) == ("me/repo", "sub/best.pt", "v2")
    r = parse_reference("hf://me/repo@refs/pr/3/sub/best.pt")
    assert (r.repo, r.path, r.revision) == ("me/repo", "sub/best.pt", "refs/pr/3")
    r = parse_reference(Path("hf://me/repo/best.pt"))  # pathlib folds '//' into '/'
    assert (r.repo, r.path, r.revision) == ("me/repo", "best.pt", None)
    r = parse_reference("MSVR10P2-8192@" + C_OLD)
    assert (r.repo, r.path, r.revision) == (REPO, "MSVR10P2-8192/best_ckpt.pt", C_OLD)
    assert parse_reference("runs/tiny/best") is None and parse_reference("no-such-model") is None
    with pytest.raises(CheckpointError, match="malformed"):
        parse_reference("hf://only-one-part")


# ------------------------------------------------------------------------------------------------ resolution


def test_names_hf_references_and_revisions_resolve_offline(msvr_cached) -> None:
    assert _same(load_tokenizer("MSVR10P2-4096"), msvr_cached["main"])
    assert _same(load_tokenizer(f"hf://{REPO}/MSVR10P2-4096/best_ckpt.pt"), msvr_cached["main"])
    assert _same(load_tokenizer(Path(f"hf://{REPO}/MSVR10P2-4096/best_ckpt.pt")), msvr_cached["main"])
    assert _same(load_tokenizer("MSVR10P2-4096@v1"), msvr_cached["old"])  # a tag
    assert _same(load_tokenizer(f"MSVR10P2-4096@{C_OLD}"), msvr_cached["old"])  # a commit
    assert _same(load_tokenizer(f"hf://{REPO}@v1/MSVR10P2-4096/best_ckpt.pt"), msvr_cached["old"])
    assert _same(load_tokenizer(f"hf://{REPO}/MSVR10P2-4096/best_ckpt.pt@{C_OLD}"), msvr_cached["old"])


def test_missing_file_offline_is_one_line_with_the_download_command(hub, msvr_cached) -> None:
    with pytest.raises(ModelNotCachedError) as err:
        load_tokenizer("MSVR10P2-8192")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and str(hub) in msg
    assert "`hf download qiuk6/XQ-GAN MSVR10P2-8192/best_ckpt.pt`" in msg
    with pytest.raises(ModelNotCachedError, match=r"`hf download qiuk6/XQ-GAN MSVR10P2-4096/best_ckpt.pt --revision v9`"):
        load_tokenizer("MSVR10P2-4096@v9")  # a revision the cache does not know
    with pytest.raises(ModelNotCachedError, match="hf download someone/else weights/x.pt"):
        load_var("hf://someone/else/weights/x.pt")


def test_corrupted_cached_file_is_refused_by_name(msvr_cached) -> None:
    blob: Path = msvr_cached["blob"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a readable zip for torch
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"MSVR10P2-4096 \(hf://qiuk6/XQ-GAN/MSVR10P2-4096/best_ckpt.pt\).*corrupted"):
        load_tokenizer("MSVR10P2-4096")
    blob.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(CheckpointError, match="MSVR10P2-4096.*corrupted.*--force-download"):
        load_tokenizer("MSVR10P2-4096")
    blob.write_bytes(b"")
    with pytest.raises(CheckpointError, match="MSVR10P2-4096.*empty"):
        load_tokenizer("MSVR10P2-4096")


def test_injected_registry_entry_checks_size_and_kind(hub, tmp_path, monkeypatch, tiny_cnn_cfg) -> None:
    data, state = official_tokenizer_bytes(tiny_cnn_cfg, seed=3)
    add_hub_file(hub, "me/tok", "tiny/best.pt", data, commit=C_MAIN)
    reg = tmp_path / "reg.yaml"
    spec = {"kind": "tokenizer", "repo": "me/tok", "file": "tiny/best.pt", "size": len(data)}
    reg.write_text(yaml.safe_dump({"models": {"TINY": spec, "TINY-WRONG-SIZE": dict(spec, size=len(data) + 1)}}))
    monkeypatch.setenv("XQTOOL_REGISTRY", str(reg))
    assert _same(load_tokenizer("tiny"), state)
    with pytest.raises(CheckpointError, match=rf"TINY-WRONG-SIZE .*has {len(data)} bytes, the registry says {len(data) + 1}"):
        load_tokenizer("TINY-WRONG-SIZE")
    with pytest.raises(CheckpointError, match="TINY is a tokenizer .*not a VAR generator"):
        load_var("TINY")
    with pytest.raises(CheckpointError, match="VAR-d17 is a VAR generator .*--var.*not a tokenizer"):
        load_tokenizer("VAR-d17")


def test_var_by_name_and_xqtool_dir_by_hf_reference(hub, tmp_path, tiny_cnn_cfg, images32) -> None:
    add_hub_file(hub, REPO, "VAR-d17-MSVR10P2-4096/ar-ckpt-last.pth", official_var_bytes(seed=0), commit=C_MAIN)
    var, info = load_var("VAR-d17")
    assert info["format"] == "official" and var.patch_nums == (1, 1, 2, 3) and var.depth == 2

    tok = build_tokenizer(tiny_cnn_cfg).eval()
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in tok.state_dict().items()}
    local = save_tokenizer(tmp_path / "mine", tok, ema_state=ema)
    for f in sorted(os.listdir(local)):
        add_hub_file(hub, "me/my-tokenizer", f, (local / f).read_bytes(), commit=C_MAIN, lfs=f != "config.yaml")
        add_hub_file(hub, "me/nested", f"runs/best/{f}", (local / f).read_bytes(), commit=C_MAIN,
                     lfs=f != "config.yaml")
    from_hub = load_tokenizer("hf://me/my-tokenizer")
    assert torch.equal(from_hub.encode(images32), load_tokenizer(local).encode(images32))
    assert torch.equal(from_hub.quant_conv.bias, tok.quant_conv.bias + 0.5)  # the EMA weights came along
    assert torch.equal(load_tokenizer("hf://me/nested/runs/best").quant_conv.bias, tok.quant_conv.bias + 0.5)
    with pytest.raises(ModelNotCachedError, match="hf download me/absent config.yaml model.safetensors ema.safetensors"):
        load_tokenizer("hf://me/absent")


def test_local_paths_still_win_and_unknown_names_say_not_found(tmp_path, monkeypatch, hub, tiny_cnn_cfg) -> None:
    save_tokenizer(tmp_path / "MSVR10P2-4096", build_tokenizer(tiny_cnn_cfg))
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("MSVR10P2-4096").codebook_size == 64  # the local dir, not the Hub
    with pytest.raises(CheckpointError, match="not found: no-such-model"):
        load_tokenizer("no-such-model")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_offline_miss_is_one_error_line_exit_2(hub, tmp_path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from xqtool.cli import app

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 40)).save(imgs / "a.png")
    res = CliRunner().invoke(app, ["encode", str(imgs), "-o", str(tmp_path / "t.npy"), "-t", "MSVR10P2-4096"],
                             env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "hf download qiuk6/XQ-GAN MSVR10P2-4096/best_ckpt.pt" in errors[0]
    assert not (tmp_path / "t.npy").exists()


def test_models_table_and_json(hub, msvr_cached) -> None:
    from typer.testing import CliRunner

    from xqtool.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert len(rows) == 10 and rows["MSVR10P2-4096"]["cached"] is True and rows["MSVR10P2-8192"]["cached"] is False
    assert rows["VAR-d17"]["metric"] == {"gFID": 2.6} and rows["VP2-4096"]["codebook"] == 4096
    table = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    line = next(ln for ln in table.stdout.splitlines() if " MSVR10P2-4096 " in ln)
    for cell in ("tokenizer", "572", "4096", "rFID 0.80", "unknown", "yes", "ImageNet"):
        assert cell in line, (cell, line)


# ------------------------------------------------------------------------------------------------ backbones


def _tiny_vit_safetensors(path: Path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_backbone_weights_hub_keyword_and_hf_reference(hub, tmp_path, monkeypatch) -> None:
    import timm

    from xqtool.errors import WeightsMissingError
    from xqtool.checkpoints.pretrained import load_backbone_weights, resolve_weights
    from xqtool.models.teachers import teacher_weights_available

    dinov2 = "vit_base_patch14_dinov2.lvd142m"  # timm's Hub repository: timm/vit_base_patch14_dinov2.lvd142m
    with pytest.raises(WeightsMissingError, match="`hf download timm/vit_base_patch14_dinov2.lvd142m model.safetensors`"):
        teacher_weights_available("dinov2", "hub")

    src = _tiny_vit_safetensors(tmp_path / "w.safetensors")
    blob = add_hub_file(hub, f"timm/{dinov2}", "model.safetensors", (tmp_path / "w.safetensors").read_bytes(),
                        commit=C_MAIN)
    path, origin = resolve_weights(dinov2, "hub", "XQTOOL_DINOV2_WEIGHTS")
    assert origin == "hub" and path.resolve() == blob.resolve()
    assert teacher_weights_available("dinov2", "hub") is True
    target = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=0)
    load_backbone_weights(target, "hub", kind="DINOv2", env_var="XQTOOL_DINOV2_WEIGHTS", model_name=dinov2)
    assert torch.equal(target.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # the same file by hf:// reference, through the environment variable route
    monkeypatch.setenv("XQTOOL_DINOV2_WEIGHTS", f"hf://timm/{dinov2}/model.safetensors")
    path, origin = resolve_weights(dinov2, None, "XQTOOL_DINOV2_WEIGHTS")
    assert origin == "XQTOOL_DINOV2_WEIGHTS" and path.resolve() == blob.resolve()
    monkeypatch.delenv("XQTOOL_DINOV2_WEIGHTS")
    blob.write_bytes(blob.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="corrupted"):
        resolve_weights(dinov2, "hub", "XQTOOL_DINOV2_WEIGHTS")


def test_inception_and_lpips_weights_by_hf_reference(hub) -> None:
    from xqtool.errors import WeightsMissingError
    from xqtool.losses.lpips import LPIPS
    from xqtool.metrics import resolve_inception_weights

    blob = add_hub_file(hub, "me/fid", "inception-2015-12-05.pt", b"torchscript bytes", commit=C_MAIN)
    assert resolve_inception_weights("hf://me/fid/inception-2015-12-05.pt").resolve() == blob.resolve()
    with pytest.raises(WeightsMissingError, match="hf download me/fid pt_inception.pth"):
        resolve_inception_weights("hf://me/fid/pt_inception.pth", mode="legacy_pytorch")
    with pytest.raises(WeightsMissingError, match="no known Hugging Face Hub location"):
        resolve_inception_weights("hub")
    lp = add_hub_file(hub, "me/lpips", "vgg.pth", b"heads", commit=C_MAIN)
    assert LPIPS._find_lpips_file(Path("hf://me/lpips/vgg.pth")).resolve() == lp.resolve()
    with pytest.raises(WeightsMissingError, match="hf download timm/vgg16.tv_in1k model.safetensors"):
        LPIPS._find_vgg_file("hub")


def test_hf_hub_cache_wins_over_hf_home_and_var_dirs_load_by_hf_reference(hub, tmp_path, monkeypatch) -> None:
    from xqtool.config import VARModelConfig
    from xqtool.models.var import VAR
    from xqtool.checkpoints import save_var

    other = tmp_path / "elsewhere"
    cfg = VARModelConfig(depth=2, width=64, num_heads=2, num_classes=10, patch_nums=(1, 1, 2, 3), codebook_size=16,
                         num_branches=2, branch_dim=4)
    var = VAR(cfg)
    local = save_var(tmp_path / "var-last", var)
    for f in sorted(os.listdir(local)):
        add_hub_file(other, "me/tiny-var", f, (local / f).read_bytes(), commit=C_MAIN, lfs=f != "config.yaml")
    with pytest.raises(ModelNotCachedError, match=str(hub)):
        load_var("hf://me/tiny-var")  # HF_HOME's cache does not have it
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    loaded, info = load_var("hf://me/tiny-var")
    assert info["format"] == "xqtool" and torch.equal(loaded.head.weight, var.head.weight)
