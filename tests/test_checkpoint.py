"""Checkpoints: xqtool format, official layouts, and refusing foreign/unsafe/corrupt files."""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, LAYOUTS
from xqtool.checkpoints import (
    check_state_fits,
    load_tokenizer,
    map_official_tokenizer_keys,
    safe_torch_load,
    save_tokenizer,
)
from xqtool.config import config_to_dict, load_tokenizer_config
from xqtool.errors import CheckpointError
from xqtool.models.tokenizer import build_tokenizer

TOKENIZER_LAYOUTS = ["VQ-4096", "VQ-8192", "VP2-4096", "VP2-16384", "MSVR10P2-4096", "MSVR10P2-8192",
                     "MSVR10P2-16384", "MSBR10P2-4096", "MSBR10P2-16384"]


def _official_blob(state: dict, cfg) -> dict:
    flat = {k: v for section in config_to_dict(cfg).values() for k, v in section.items()}
    return {"model": state, "ema": state, "steps": 7, "args": argparse.Namespace(**flat)}


@pytest.mark.parametrize("name", TOKENIZER_LAYOUTS)
def test_official_layout_maps_with_no_missing_or_unexpected_key(name: str) -> None:
    layout = json.loads((LAYOUTS / f"{name}.json").read_text())
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in layout.items()}
        model = build_tokenizer(load_tokenizer_config(CONFIGS / f"{name}.yaml"))
    mapped = map_official_tokenizer_keys(state)
    assert not any(k.startswith(("semantic_model.", "detail_model.")) for k in mapped)
    own = model.state_dict()
    assert set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own)
    check_state_fits(own, mapped, name)  # raises on any mismatch


def test_full_size_official_file_loads_and_encodes(tmp_path) -> None:
    """A real MSVR10P2-4096-shaped .pt of random tensors (teacher included) loads with its stored args."""
    layout = json.loads((LAYOUTS / "MSVR10P2-4096.json").read_text())
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in layout.items():
        if k.endswith("lvl1LC"):
            state[k] = torch.zeros(shape, dtype=torch.long)
        else:
            state[k] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    path = tmp_path / "best_ckpt.pt"
    torch.save(_official_blob(state, load_tokenizer_config(CONFIGS / "MSVR10P2-4096.yaml")), path)
    tok = load_tokenizer(path)
    assert tok.num_branches == 2 and tok.codebook_size == 4096
    emb = tok.quantizer.quantizes[1].embedding.weight
    assert torch.equal(emb, state["quantizes.1.embedding.weight"].float())
    del state


def test_xqtool_dir_round_trip_and_ema_preference(tmp_path, tiny_cnn_cfg, images32) -> None:
    tok = build_tokenizer(tiny_cnn_cfg).eval()
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in tok.state_dict().items()}
    save_tokenizer(tmp_path / "ckpt", tok, ema_state=ema)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.yaml", "ema.safetensors", "model.safetensors"]
    raw = load_tokenizer(tmp_path / "ckpt", prefer_ema=False)
    assert torch.equal(raw.encode(images32), tok.encode(images32))
    smoothed = load_tokenizer(tmp_path / "ckpt")
    assert torch.equal(smoothed.quant_conv.bias, tok.quant_conv.bias + 1.0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_tiny_official_file_with_args(tmp_path, tiny_vit_cfg, images32) -> None:
    tok = build_tokenizer(tiny_vit_cfg).eval()
    official = {k.replace("quantizer.quantizes.", "quantizes."): v for k, v in tok.state_dict().items()}
    official["semantic_model.cls_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "tiny.pt"
    torch.save(_official_blob(official, tiny_vit_cfg), path)
    loaded = load_tokenizer(path)
    assert torch.equal(loaded.encode(images32), tok.encode(images32))


def test_wrong_codebook_size_names_the_key(tmp_path, tiny_cnn_cfg) -> None:
    save_tokenizer(tmp_path / "ckpt", build_tokenizer(tiny_cnn_cfg))
    other = load_tokenizer_config(CONFIGS / "tiny-cnn.yaml", ["quant.codebook_size=128"])
    with pytest.raises(CheckpointError, match=r"quantizer\.quantizes\.0\.embedding\.weight: \[64, 8\].*\[128, 8\]"):
        load_tokenizer(tmp_path / "ckpt", config=other)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/xqtool_pwned",))


def test_refuses_foreign_unsafe_and_corrupt_files(tmp_path, tiny_cnn_cfg) -> None:
    cfg_path = CONFIGS / "tiny-cnn.yaml"
    var = tmp_path / "ar-ckpt-last.pth"
    torch.save({"epoch": 1, "trainer": {"var_wo_ddp": {"head.weight": torch.zeros(2, 2)}}}, var)
    with pytest.raises(CheckpointError, match="VAR generator checkpoint"):
        load_tokenizer(var, config=cfg_path)

    random_pt = tmp_path / "random.pt"
    torch.save({"weights": torch.zeros(3)}, random_pt)
    with pytest.raises(CheckpointError, match="does not look like an XQ-GAN tokenizer"):
        load_tokenizer(random_pt, config=cfg_path)
    torch.save({"epoch": 3, "notes": "x"}, random_pt)
    with pytest.raises(CheckpointError, match="no 'ema', 'model' or 'state_dict'"):
        load_tokenizer(random_pt, config=cfg_path)

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    if os.path.exists("/tmp/xqtool_pwned"):
        os.remove("/tmp/xqtool_pwned")
    with pytest.raises(CheckpointError):
        safe_torch_load(evil)
    assert not os.path.exists("/tmp/xqtool_pwned")
    # an unsupported pickle (protocol 4): one complete reason, torch's protocol warning not passed on
    odd = tmp_path / "odd.pt"
    with open(odd, "wb") as fh:
        pickle.dump(collections.Counter(a=1), fh, protocol=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as err:
            safe_torch_load(odd)
    assert not [w for w in seen if "pickle protocol" in str(w.message)]
    assert "(Unsupported operand" in str(err.value) and str(err.value).endswith(")"), str(err.value)

    save_tokenizer(tmp_path / "ok", build_tokenizer(tiny_cnn_cfg))
    good = tmp_path / "good.pt"
    torch.save({"model": build_tokenizer(tiny_cnn_cfg).state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_tokenizer(truncated, config=cfg_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_tokenizer(tmp_path / "empty.pt", config=cfg_path)
    with pytest.raises(CheckpointError, match="carries no config"):
        load_tokenizer(good)


def test_tokenizer_and_var_directories_are_not_confused(tmp_path, tiny_cnn_cfg) -> None:
    from xqtool.config import load_var_config
    from xqtool.models.var import build_var
    from xqtool.checkpoints import load_var, save_var

    save_tokenizer(tmp_path / "tok", build_tokenizer(tiny_cnn_cfg))
    var_cfg = load_var_config(Path(__file__).resolve().parents[1] / "configs" / "var" / "tiny.yaml")
    save_var(tmp_path / "var", build_var(var_cfg.model))
    with pytest.raises(CheckpointError, match="is a VAR generator checkpoint, not a tokenizer"):
        load_tokenizer(tmp_path / "var")
    with pytest.raises(CheckpointError, match="is a tokenizer checkpoint, not a VAR model"):
        load_var(tmp_path / "tok")
