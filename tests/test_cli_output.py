"""Output people read: plain log lines when piped, summaries that say what ran, a readable recon grid."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import xqtool.cli
from xqtool.data.samples import sample_photo_folder
from xqtool.training.reporting import recon_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos") / "sample"
    sample_photo_folder(root, 32)
    return root


def test_piped_train_tokenizer_logs_every_log_every_and_every_validation(photos, tmp_path: Path) -> None:
    # CliRunner's stdout is not a terminal: the run must print plain lines, not only a final bar
    r = CliRunner().invoke(xqtool.cli.app, [
        "train-tokenizer", str(ROOT / "configs/tokenizer/tiny-vit.yaml"), "-o", str(tmp_path / "run"),
        "--max-steps", "4", "--set", f"data.data_path={photos / 'train'}",
        "--set", f"data.val_data_path={photos / 'val'}", "--set", "train.global_batch_size=4",
        "--set", "train.tracker=none", "--set", "loss.disc_type=none", "--set", "model.vit_embed_dim=16",
        "--set", "train.log_every=2", "--set", "train.eval_every=2", "--set", "data.max_val_images=4",
    ], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    steps = re.findall(r"^step (\d+)/4 .*rec_loss [0-9.]+", r.output, flags=re.M)
    assert steps == ["1", "2", "4"]  # step 1, then every log_every=2, and the last
    assert re.findall(r"^validation at step (\d+): psnr [0-9.]+ ssim", r.output, flags=re.M) == ["2", "4"]
    out = " ".join(r.output.split())
    assert "world size 1, device cpu, precision" in out and str(tmp_path / "run") in out
    grid = np.asarray(Image.open(tmp_path / "run" / "recon" / "step-0000004.png"))
    assert grid.shape[0] >= 2 * 128 and grid.shape[1] >= 128  # 32 px crops upscaled to a viewable size


def test_recon_grid_upscales_tiles_and_labels_rows() -> None:
    g = torch.Generator().manual_seed(0)
    orig = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    recon = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    arr = recon_grid(orig, recon, step=1234)
    u8 = ((orig + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    r8 = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    up = lambda a: np.repeat(np.repeat(a, 4, axis=0), 4, axis=1)  # 32 px -> 128 px, nearest
    label_h, pad = 16, 2
    assert arr.shape == (2 * (label_h + 128 + pad), 3 * (128 + pad) + pad, 3)
    assert np.array_equal(arr[label_h:label_h + 128, pad:pad + 128], up(u8[0]))
    x1 = pad + 128 + pad
    assert np.array_equal(arr[label_h:label_h + 128, x1:x1 + 128], up(u8[1]))
    y1 = label_h + 128 + pad + label_h
    assert np.array_equal(arr[y1:y1 + 128, pad:pad + 128], up(r8[0]))
    # both label bands hold dark text on white
    for y in (0, label_h + 128 + pad):
        band = arr[y:y + label_h]
        assert (band < 80).any() and (band == 255).mean() > 0.5
    # the reconstruction label is longer (it names the step) than "original"
    dark_cols = lambda band: np.nonzero((band < 80).any(axis=(0, 2)))[0].max()
    assert dark_cols(arr[label_h + 128 + pad:y1]) > dark_cols(arr[:label_h])
