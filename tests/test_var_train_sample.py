"""train-var on tiny-tokenizer tokens (loss falls, exact resume, manifest check) and the sample CLI."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import photo_crops, tiny_cnn_tokens, to_tensor
from xqtool.checkpoints import save_tokenizer
from xqtool.cli import app
from xqtool.config import load_var_config
from xqtool.data.tokens import TokenManifest, write_tokens
from xqtool.errors import TokenError
from xqtool.tasks.sample import plan_labels
from xqtool.training import TrainInjected, VARRunOptions, train_var
from xqtool.training.build import param_groups
from xqtool.training.schedules import var_lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY_VAR = ROOT / "configs" / "var" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Tiny CNN tokenizer (random init, saved) and tokens of 16 real photo crops with 10 classes."""
    root = tmp_path_factory.mktemp("var")
    tok, _ = tiny_cnn_tokens(root / "train.npy", 16, seed=3, labels=[i % 10 for i in range(16)])
    save_tokenizer(root / "tok", tok)
    return root, tok


def _cfg(root: Path, run: str, *extra: str):
    return load_var_config(TINY_VAR, [f"data.tokens={root / 'train.npy'}", f"train.results_dir={root / run}",
                                      *extra])


def test_tiny_var_loss_falls(tiny_data) -> None:
    root, tok = tiny_data
    cfg = _cfg(root, "run-loss", "train.max_steps=20", "train.tblr=0.1", "train.ckpt_every=0")
    res = train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(64), abs=0.05)  # starts at chance (K = 64)
    assert np.mean(losses[-5:]) < losses[0] - 0.4, losses  # and falls clearly
    last = res.history[-1]
    assert {"loss_s0", "acc_s3", "loss_tail", "acc"} <= set(last)  # per-scale metrics logged
    assert (res.run_dir / "var-last" / "model.safetensors").is_file()


def test_resume_is_exact(tiny_data) -> None:
    root, tok = tiny_data
    extra = ("train.max_steps=6", "train.ckpt_every=3", "train.keep_last=5")
    full = train_var(_cfg(root, "run-a", *extra), VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    cfg_b = _cfg(root, "run-b", *extra)
    train_var(cfg_b, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
    run_b = Path(cfg_b.train.results_dir)
    shutil.rmtree(run_b / "checkpoints" / "step-0000006")  # as if killed after the step-3 checkpoint
    shutil.rmtree(run_b / "var-last")
    resumed = train_var(cfg_b, VARRunOptions(resume="auto", cpu=True), TrainInjected(tokenizer=tok))
    assert resumed.resumed_from == 3 and len(resumed.history) == 3
    a = load_file(str(full.run_dir / "var-last" / "model.safetensors"))
    b = load_file(str(run_b / "var-last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history[3:]] == [h["loss"] for h in resumed.history]


def test_token_manifest_mismatch_is_refused(tiny_data, tmp_path: Path) -> None:
    root, tok = tiny_data
    manifest = TokenManifest.from_tokenizer(tok, labels=[0] * 8)
    manifest.config_hash = "0123456789ab"
    write_tokens(tmp_path / "other.npy", np.zeros((8, 2, 85), np.int16), manifest)
    cfg = load_var_config(TINY_VAR, [f"data.tokens={tmp_path / 'other.npy'}", f"train.results_dir={tmp_path}/r"])
    with pytest.raises(TokenError, match="config_hash"):
        train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))


def test_schedule_groups_and_labels() -> None:
    assert var_lr_factor(0, 10, 100) == pytest.approx(0.005)
    assert var_lr_factor(10, 10, 100) == 1.0 and var_lr_factor(99, 10, 100) == pytest.approx(0.01)
    from xqtool.models.var import VAR
    from test_var_model import tiny_cfg

    groups = param_groups(VAR(tiny_cfg()), 0.05)
    no_wd = {id(p) for p in groups[1]["params"]}
    model = VAR(tiny_cfg())
    groups = param_groups(model, 0.05)
    no_wd = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_wd}
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias"} <= names
    assert "blocks.0.attn.mat_qkv.weight" not in names and "class_emb.weight" not in names
    assert plan_labels(10, [1, 3], per_class=2) == [1, 1, 3, 3]
    assert plan_labels(3, per_class=1) == [0, 1, 2] and plan_labels(3, num_samples=4) == [0, 1, 2, 0]


def test_cli_train_then_sample_batch_size_invariant(tiny_data, tmp_path: Path) -> None:
    root, _ = tiny_data
    runner = CliRunner()
    res = runner.invoke(app, ["train-var", str(TINY_VAR), "--tokens", str(root / "train.npy"), "-t",
                              str(root / "tok"), "--max-steps", "2", "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    var_dir = tmp_path / "run" / "var-last"
    common = ["sample", "--var", str(var_dir), "-t", str(root / "tok"), "--classes", "1,3",
              "--per-class", "2", "--top-k", "20", "--cfg", "2.0", "--seed", "7", "--device", "cpu"]
    res4 = runner.invoke(app, common + ["-b", "4", "--npz", str(tmp_path / "a.npz"), "-o", str(tmp_path / "png"),
                                        "--grid", str(tmp_path / "grid.png")])
    assert res4.exit_code == 0, res4.output
    res1 = runner.invoke(app, common + ["-b", "1", "--npz", str(tmp_path / "b.npz")])
    assert res1.exit_code == 0, res1.output
    res_plain = runner.invoke(app, common + ["-b", "2", "--no-pack", "--npz", str(tmp_path / "p.npz")])
    assert res_plain.exit_code == 0, res_plain.output
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    # MKL instead of packed oneDNN linears: the same images up to float rounding of the logits
    plain = np.load(tmp_path / "p.npz")["arr_0"]
    assert plain.shape == a.shape and np.mean(plain == a) > 0.9
    # files named by class and index within the class; PNG i is image i of the npz
    names = ["class0001_000000.png", "class0001_000001.png", "class0003_000000.png", "class0003_000001.png"]
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == names
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / name).convert("RGB")), a[i])
    # the grid has one row per class: 2 classes x 2 images of 32 px with 2 px padding
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    assert np.array_equal(grid[36:68, 2:34], a[2]) and np.array_equal(grid[2:34, 36:68], a[1])
    bad = runner.invoke(app, ["sample", "--var", str(tmp_path / "nope"), "-t", str(root / "tok"),
                              "-n", "2", "--npz", str(tmp_path / "c.npz")])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_train_var_records_classes_and_sample_warns_for_unseen(tiny_data, tmp_path: Path) -> None:
    """train-var writes the class ids that occurred (labels 0..4 only here); sample warns for class 7."""
    import yaml

    root, tok = tiny_data
    tokens = tok.encode(to_tensor(photo_crops(8, 32, seed=4)))
    labels = [i % 5 for i in range(8)]  # classes 0..4 of the model's 10
    manifest = TokenManifest.from_tokenizer(tok, labels=labels, keys=[f"k{i}" for i in range(8)])
    write_tokens(tmp_path / "five.npy", tokens.numpy(), manifest)
    runner = CliRunner()
    res = runner.invoke(app, ["train-var", str(TINY_VAR), "--tokens", str(tmp_path / "five.npy"), "-t",
                              str(root / "tok"), "--max-steps", "3", "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^train-var step 3/3 loss [0-9.]+", res.output, flags=re.M)  # piped: plain log lines
    assert "world size 1, device cpu" in " ".join(res.output.split())
    conf = yaml.safe_load((tmp_path / "run" / "var-last" / "config.yaml").read_text())
    assert conf["classes_seen"] == [0, 1, 2, 3, 4]  # 3 steps x batch 8 covers the 8 rows
    common = ["sample", "--var", str(tmp_path / "run" / "var-last"), "-t", str(root / "tok"), "--per-class", "1",
              "--top-k", "5", "--device", "cpu", "--npz", str(tmp_path / "s.npz")]
    warned = runner.invoke(app, common + ["--classes", "1,7"])
    assert warned.exit_code == 0, warned.output
    assert "class(es) 7 never occurred" in " ".join(warned.output.split())
    quiet = runner.invoke(app, common + ["--classes", "1,4", "--overwrite"])  # s.npz exists: replace it
    assert quiet.exit_code == 0 and "never occurred" not in quiet.output


def test_trains_from_token_shards_and_from_images(tiny_data, tmp_path: Path) -> None:
    """The two other data paths of train-var: WebDataset token shards from `xqtool encode`, and images encoded on the fly."""
    from PIL import Image

    from xqtool.tasks.encode import EncodeSettings, encode_images
    from xqtool.tasks.injected import Injected

    root, tok = tiny_data
    images = tmp_path / "imgs" / "cls0"
    images.mkdir(parents=True)
    for i, arr in enumerate(photo_crops(12, 32, seed=5)):
        Image.fromarray(arr).save(images / f"{i:03d}.png")
    encode_images(EncodeSettings(source=tmp_path / "imgs", output=tmp_path / "shards", batch_size=4),
                  Injected(tokenizer=tok))
    assert (tmp_path / "shards" / "manifest.json").is_file()
    for run, source in (("run-shards", f"data.tokens={tmp_path / 'shards'}"), ("run-images", f"data.images={tmp_path / 'imgs'}")):
        cfg = load_var_config(TINY_VAR, ["data.tokens=null", source, f"train.results_dir={tmp_path / run}",
                                         "train.max_steps=4", "train.ckpt_every=0"])
        res = train_var(cfg, VARRunOptions(cpu=True), TrainInjected(tokenizer=tok))
        assert len(res.history) == 4 and all(np.isfinite(h["loss"]) for h in res.history)
        assert (res.run_dir / "var-last" / "model.safetensors").is_file()
