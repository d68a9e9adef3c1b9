"""Decoding is batch-size invariant: `xqtool decode -b B` and `sample -b B` give the same bytes for B = 1..5.

The reference is each image decoded alone (batch 1), computed outside the task under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cnn_tokens
from xqtool.config import load_var_config
from xqtool.data.tokens import TokenManifest, write_tokens
from xqtool.models.var import build_var
from xqtool.tasks.decode import DecodeSettings, decode_tokens
from xqtool.tasks.injected import Injected
from xqtool.tasks.sample import SampleSettings, sample_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_and_tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    tok, tokens = tiny_cnn_tokens(root / "t.npy", 24, seed=11)
    few = TokenManifest.from_tokenizer(tok, keys=[f"img{i}" for i in range(3)])
    write_tokens(root / "t3.npy", tokens[:3].numpy(), few)
    return root, tok, tokens


def _alone(tok, tokens) -> np.ndarray:
    """Reference: each row decoded in a batch of its own, quantised like the PNG writer."""
    with torch.inference_mode():
        imgs = [tok.decode(tokens[j : j + 1]) for j in range(tokens.shape[0])]
    x = torch.cat(imgs).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5])
def test_decode_png_bytes_independent_of_batch_size(tok_and_tokens, tmp_path, batch_size):
    root, tok, tokens = tok_and_tokens
    want = _alone(tok, tokens)
    res = decode_tokens(DecodeSettings(tokens=root / "t.npy", out_dir=tmp_path / "out", batch_size=batch_size,
                                       device="cpu"),
                        Injected(tokenizer=tok))
    assert res.count == 24
    for j in range(24):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"img{j}.png")), want[j])


def test_progressive_strips_match_the_images(tok_and_tokens, tmp_path):
    root, tok, tokens = tok_and_tokens
    want = _alone(tok, tokens[:3])
    decode_tokens(DecodeSettings(tokens=root / "t3.npy", out_dir=tmp_path / "out", batch_size=2, device="cpu",
                                 progressive=True),
                  Injected(tokenizer=tok))
    for j in range(3):
        strip = np.asarray(Image.open(tmp_path / "out" / f"img{j}.progressive.png"))
        assert strip.shape == (32 * (1 + tok.num_branches), 32 * len(tok.scales), 3)
        np.testing.assert_array_equal(strip[:32, -32:], want[j])  # all branches, finest scale == the image


def test_sample_images_independent_of_batch_size(tok_and_tokens, tmp_path):
    _, tok, _ = tok_and_tokens
    torch.manual_seed(1)
    var = build_var(load_var_config(ROOT / "configs" / "var" / "tiny.yaml").model).eval()
    labels = [i % 10 for i in range(10)]
    outs = {}
    for b in range(1, 6):
        sample_images(SampleSettings(labels=labels, cfg=2.0, top_k=20, top_p=0.9, seed=3, batch_size=b,
                                     npz=tmp_path / f"b{b}.npz", cpu=True), Injected(var=var, tokenizer=tok))
        outs[b] = np.load(tmp_path / f"b{b}.npz")["arr_0"]
    for b in range(2, 6):
        np.testing.assert_array_equal(outs[b], outs[1])
    assert outs[1].shape == (10, 32, 32, 3)
