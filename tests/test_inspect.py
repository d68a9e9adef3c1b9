"""`xqtool inspect` recognises and summarises every artefact xqtool reads or writes (tables and --json)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import CONFIGS, ROOT, photo_crops, to_tensor
from test_var_model import _official_d17_file
from xqtool.checkpoints import save_tokenizer
from xqtool.cli import app
from xqtool.config import config_to_dict, load_tokenizer_config
from xqtool.data.tokens import TokenManifest, write_tokens
from xqtool.models.tokenizer import build_tokenizer

LAYOUTS = Path("/work/shared/spec/layouts")
if not LAYOUTS.is_dir():  # CI lays shared/ beside the checkout
    LAYOUTS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "layouts"
D17_PARAMS = 375_258_593  # VAR-d17 on MSVR10P2-4096 (issue 16 / spec var.md)
TINY_VAR = ROOT / "configs" / "var" / "tiny.yaml"
runner = CliRunner()


def _json(target, *extra: str) -> dict:
    r = runner.invoke(app, ["inspect", str(target), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("insp")
    tok = build_tokenizer(load_tokenizer_config(CONFIGS / "tiny-cnn.yaml")).eval()
    save_tokenizer(root / "tok", tok)
    return root, tok


def test_var_config_d17_parameter_count() -> None:
    rep = _json(ROOT / "configs" / "var" / "d17-msvr10p2.yaml")
    assert rep["kind"] == "VAR config"
    assert rep["parameters"]["total"] == D17_PARAMS
    assert sum(v for k, v in rep["parameters"].items() if k != "total") == D17_PARAMS
    assert rep["facts"]["depth"] == 17 and rep["facts"]["tokens per branch (L)"] == 286
    table = runner.invoke(app, ["inspect", str(ROOT / "configs" / "var" / "d17-msvr10p2.yaml")],
                          env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "375,258,593" in table.output and "did you mean" not in table.output


def test_tokenizer_config_and_checkpoints(tiny_tok, tmp_path: Path, tiny_vit_cfg) -> None:
    rep = _json(CONFIGS / "MSVR10P2-4096.yaml")
    assert rep["kind"] == "tokenizer config" and rep["parameters"]["total"] == 172_327_456
    assert rep["facts"]["tokens per image"] == 2 * 286
    root, tok = tiny_tok
    own = _json(root / "tok")
    expected = sum(p.numel() for p in tok.parameters())
    assert own["kind"] == "tokenizer checkpoint" and own["parameters"]["total"] == expected
    # official XQ-GAN .pt (args + model + ema)
    vit = build_tokenizer(tiny_vit_cfg).eval()
    state = {k.replace("quantizer.quantizes.", "quantizes."): v for k, v in vit.state_dict().items()}
    flat = {k: v for section in config_to_dict(tiny_vit_cfg).values() for k, v in section.items()}
    torch.save({"model": state, "ema": state, "steps": 7, "args": argparse.Namespace(**flat)}, tmp_path / "best.pt")
    off = _json(tmp_path / "best.pt")
    assert off["kind"] == "official tokenizer checkpoint"
    assert off["parameters"]["total"] == sum(p.numel() for p in vit.parameters())


def test_var_checkpoints_own_and_released_layout(tmp_path: Path) -> None:
    from xqtool.config import load_var_config
    from xqtool.models.var import build_var
    from xqtool.checkpoints import save_var

    cfg = load_var_config(TINY_VAR)
    model = build_var(cfg.model)
    save_var(tmp_path / "var-last", model, extra_config={"step": 5, "classes_seen": [0, 3]})
    own = _json(tmp_path / "var-last")
    assert own["kind"] == "VAR checkpoint" and own["facts"]["step"] == 5
    assert own["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert own["facts"]["classes seen in training"] == f"2 of {cfg.model.num_classes}"
    # the released layout: a d17 `ar-ckpt-last.pth` built from the spec's shapes (stride-0 tensors, small file)
    released = tmp_path / "ar-ckpt-last.pth"
    _official_d17_file(released)
    rep = _json(released)
    assert rep["kind"] == "official VAR checkpoint" and rep["parameters"]["total"] == D17_PARAMS
    if LAYOUTS.is_dir():  # the same figure from the layout file: every tensor but the derived buffers
        layout = json.loads((LAYOUTS / "VAR-d17-MSVR10P2-4096.json").read_text())
        buffers = ("attn_bias_for_masking", "lvl_1L", "zero_k_bias")
        assert rep["parameters"]["total"] == sum(math.prod(s) for k, s in layout.items() if not k.endswith(buffers))
    assert rep["facts"]["epoch"] == 350 and rep["facts"]["depth"] == 17


def test_token_file_and_token_shards(tiny_tok, tmp_path: Path) -> None:
    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.injected import Injected

    root, tok = tiny_tok
    tokens = tok.encode(to_tensor(photo_crops(6, 32, seed=2)))
    labels = [2, 2, 5, 0, 5, 5]
    write_tokens(tmp_path / "t.npy", tokens.numpy(), TokenManifest.from_tokenizer(tok, labels=labels,
                                                                                 keys=[f"k{i}" for i in range(6)]))
    rep = _json(tmp_path / "t.npy")
    assert rep["kind"] == "token file" and rep["facts"]["rows"] == 6
    assert rep["facts"]["shape [N, P, L]"] == [6, tok.num_branches, tok.tokens_per_branch]
    assert rep["facts"]["codebook size"] == tok.codebook_size and "config hash" in rep["facts"]
    assert rep["histogram"] == {"0": 1, "2": 2, "5": 3}
    # shard folder written by encode from a two-class tree
    for c, n in (("a", 3), ("b", 2)):
        d = tmp_path / "imgs" / c
        d.mkdir(parents=True)
        for i, arr in enumerate(photo_crops(n, 32, seed=7 + n)):
            Image.fromarray(arr).save(d / f"{i}.png")
    encode_images(EncodeSettings(source=tmp_path / "imgs", output=tmp_path / "shards", batch_size=4),
                  Injected(tokenizer=tok))
    rep = _json(tmp_path / "shards")
    assert rep["kind"] == "token shards" and rep["facts"]["rows"] == 5 and rep["facts"]["shard files"] >= 1
    assert rep["histogram"] == {"0": 3, "1": 2}
    assert rep["class_names"] == {"0": "a", "1": "b"}  # the folder names encode recorded
    r = runner.invoke(app, ["inspect", str(tmp_path / "shards")])
    assert r.exit_code == 0
    row = next(line for line in r.output.splitlines() if " a " in line)
    assert "0" in row and "3" in row  # class id, name and rows in one row of the histogram


def test_training_state_of_a_var_run(tiny_tok, tmp_path: Path) -> None:
    from xqtool.config import load_var_config
    from xqtool.training import TrainInjected, VARRunOptions, train_var

    root, tok = tiny_tok
    tokens = tok.encode(to_tensor(photo_crops(8, 32, seed=4)))
    write_tokens(tmp_path / "t.npy", tokens.numpy(), TokenManifest.from_tokenizer(tok, labels=[1] * 8,
                                                                                 keys=[f"k{i}" for i in range(8)]))
    cfg = load_var_config(TINY_VAR, [f"data.tokens={tmp_path / 't.npy'}", f"train.results_dir={tmp_path / 'run'}",
                                     "train.max_steps=2", "train.ckpt_every=1", "train.tracker=none"])
    res = train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    for target in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-0000002"):
        rep = _json(target)
        assert rep["kind"] == "training state", target
        f = rep["facts"]
        assert f["step"] == 2 and f["world size"] == 1
        assert f["samples seen"] == 2 * cfg.train.global_batch_size
        assert f["last loss"] == pytest.approx(res.history[-1]["loss"])


def test_image_source_counts_classes_sizes_and_bad_files(tmp_path: Path) -> None:
    crops = photo_crops(5, 40, seed=1)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    for i in range(3):
        Image.fromarray(crops[i]).save(tmp_path / "cat" / f"{i}.png")
    Image.fromarray(crops[3][:20]).save(tmp_path / "dog" / "wide.png")  # 40 x 20
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rep = _json(tmp_path)
    assert rep["kind"] == "image source"
    f = rep["facts"]
    assert f["images"] == 5 and f["classes"] == 2 and f["bad files"] == 1
    assert f["sizes"] == {"40x40": 3, "40x20": 1}
    assert rep["histogram"] == {"0": 3, "1": 2}
    assert any("broken.png" in w for w in rep["warnings"])


def test_unknown_target_is_one_line() -> None:
    r = runner.invoke(app, ["inspect", "no/such/thing.pth"])
    assert r.exit_code == 2 and "not found" in r.output


def test_config_errors_name_the_file_only_when_the_file_is_at_fault(tmp_path: Path) -> None:
    cfg = CONFIGS / "tiny-cnn.yaml"
    r = runner.invoke(app, ["inspect", str(cfg), "--set", "bad.key=1"])
    assert r.exit_code == 2
    assert "unknown key 'bad'" in r.output and str(cfg) not in r.output  # the key came from --set
    bad = tmp_path / "bad.yaml"
    bad.write_text("bad_top: 1\n")
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2 and f"{bad}: unknown key 'bad_top'" in r.output
