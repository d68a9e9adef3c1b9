"""`xqtool push`: safetensors only, model card from config + last evaluation report; never touches the network
(HfApi.create_repo / upload_folder are replaced by a recorder), and the pushed folder loads back as hf://OWNER/NAME."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _hub_fixtures import add_hub_file
from xqtool.checkpoints import load_tokenizer, save_tokenizer
from xqtool.cli import app
from xqtool.errors import CheckpointError
from xqtool.models.tokenizer import build_tokenizer
from xqtool.tasks.push import push_checkpoint


@pytest.fixture
def uploads(tmp_path, monkeypatch):
    """Replace the Hub write calls: record repos and copy each uploaded folder (it is a temp dir)."""
    import huggingface_hub

    record = {"repos": [], "folders": []}

    def create_repo(self, repo_id, **kw):
        record["repos"].append((repo_id, kw))
        return f"fake-hub:{repo_id}"  # stand-in for the repo address (nothing is contacted)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        dest = tmp_path / "uploaded" / str(len(record["folders"]))
        shutil.copytree(folder_path, dest)
        record["folders"].append((repo_id, dest, kw))
        return f"fake-hub:{repo_id}@{'c' * 40}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return record


@pytest.fixture
def ckpt(tmp_path, tiny_cnn_cfg):
    tok = build_tokenizer(tiny_cnn_cfg).eval()
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in tok.state_dict().items()}
    extra = {"train_state.json": json.dumps({"step": 40, "val": {"val/psnr": 11.5, "val/ssim": 0.21}})}
    return save_tokenizer(tmp_path / "best", tok, ema_state=ema, extra_files=extra)


def test_push_uploads_safetensors_and_a_card_from_config_and_newest_report(uploads, ckpt, tmp_path) -> None:
    report = tmp_path / "rfid_report.json"
    report.write_text(json.dumps({"task": "rfid", "metrics": {"rfid": 12.25, "psnr": 19.5, "ssim": 0.61},
                                  "image_counts": {"originals": 8}, "data": "val/"}))
    res = CliRunner().invoke(app, ["push", str(ckpt), "me/tiny-tok", "--report", str(report), "--license", "mit"])
    assert res.exit_code == 0, res.output
    (repo, folder, kw), = uploads["folders"]
    assert repo == "me/tiny-tok" and uploads["repos"][0][0] == "me/tiny-tok"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "ema.safetensors",
                                                       "model.safetensors", "rfid_report.json", "train_state.json"]
    for name in ("model.safetensors", "ema.safetensors", "config.yaml"):
        assert (folder / name).read_bytes() == (ckpt / name).read_bytes()
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "xqtool" and meta["license"] == "mit" and "image-tokenizer" in meta["tags"]
    assert "| rfid | 12.25 |" in card and "8 images" in card  # the report given, not train_state.json
    assert "2 branches x 85 = 170" in card  # tiny-cnn: scales 1,2,4,8 (hand: 1+4+16+64 = 85) x product_quant 2
    assert "64 per branch" in card and "--tokenizer hf://me/tiny-tok" in card
    assert not (ckpt / "README.md").exists()  # the checkpoint directory is left as it was


def test_pushed_folder_loads_back_by_hf_reference(uploads, ckpt, tmp_path, monkeypatch, images32) -> None:
    push_checkpoint(ckpt, "me/tiny-tok")
    _, folder, _ = uploads["folders"][0]
    assert "| psnr | 11.5 |" in (folder / "README.md").read_text()  # default report: train_state.json
    cache = tmp_path / "hf_home" / "hub"
    for f in folder.iterdir():
        add_hub_file(cache, "me/tiny-tok", f.name, f.read_bytes(), commit="d" * 40, lfs=f.suffix == ".safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(load_tokenizer("hf://me/tiny-tok").encode(images32), load_tokenizer(ckpt).encode(images32))


def test_push_refuses_pickles_and_non_checkpoints_before_uploading(uploads, ckpt, tmp_path) -> None:
    torch.save({"x": torch.zeros(2)}, ckpt / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra\.pt is a pickle-capable file.*safetensors only"):
        push_checkpoint(ckpt, "me/tiny-tok")
    (ckpt / "extra.pt").unlink()
    official = tmp_path / "best_ckpt.pt"
    torch.save({"model": {}}, official)
    res = CliRunner().invoke(app, ["push", str(official), "me/x"])
    assert res.exit_code == 2 and "safetensors only" in res.stderr
    (ckpt / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        push_checkpoint(ckpt, "me/tiny-tok")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not an xqtool checkpoint directory"):
        push_checkpoint(empty, "me/tiny-tok")
    assert uploads["folders"] == [] and uploads["repos"] == []


def test_push_var_directory(uploads, tmp_path) -> None:
    from xqtool.config import VARModelConfig
    from xqtool.models.var import VAR
    from xqtool.checkpoints import save_var

    cfg = VARModelConfig(depth=2, width=64, num_heads=2, num_classes=10, patch_nums=(1, 1, 2, 3), codebook_size=16,
                         num_branches=2, branch_dim=4)
    d = save_var(tmp_path / "var-last", VAR(cfg))
    res = push_checkpoint(d, "me/tiny-var", dry_run=True)
    assert res.kind == "var" and "2 branches x 15" in res.card and "--var hf://me/tiny-var" in res.card
    assert uploads["folders"] == []
