"""A local Hugging Face Hub cache laid out as huggingface_hub lays it out, built by hand (no network).

``<cache>/models--OWNER--NAME/{blobs/<etag>, snapshots/<commit>/<path> -> ../../blobs/<etag>, refs/<revision>}``;
the etag of a large (LFS) file is the sha256 of its content, that of a small git file its git blob sha1
(``sha1(b"blob <size>\\0" + content)``), both computed here with hashlib.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from pathlib import Path
import torch


def add_hub_file(cache: Path, repo: str, filename: str, data: bytes, *, commit: str, refs: tuple = ("main",),
                 lfs: bool = True) -> Path:
    """Put `data` at `filename` of `repo` at `commit` (and point each ref in `refs` at that commit); returns the blob."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    if lfs:
        etag = hashlib.sha256(data).hexdigest()
    else:
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    blob = folder / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return blob


def official_tokenizer_bytes(cfg, seed: int = 0) -> tuple:
    """A random-weight tokenizer of config `cfg` in the official XQ-GAN layout (``model``/``ema``/``args``):
    (file bytes, its state_dict in xqtool names)."""
    from xqtool.config import config_to_dict
    from xqtool.models.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(cfg)
    state = {k.replace("quantizer.quantizes.", "quantizes."): v for k, v in tok.state_dict().items()}
    flat = {k: v for section in config_to_dict(cfg).values() for k, v in section.items()}
    buf = io.BytesIO()
    torch.save({"model": state, "ema": state, "steps": 3, "args": argparse.Namespace(**flat)}, buf)
    return buf.getvalue(), tok.state_dict()


def official_var_bytes(seed: int = 0, patch_nums=(1, 1, 2, 3), branches: int = 2) -> bytes:
    """A tiny random-weight VAR in the released ``ar-ckpt-last.pth`` layout (``trainer.var_wo_ddp``)."""
    from xqtool.config import VARModelConfig
    from xqtool.models.var import VAR

    torch.manual_seed(seed)
    cfg = VARModelConfig(depth=2, width=64, num_heads=2, num_classes=10, patch_nums=tuple(patch_nums),
                         codebook_size=16, num_branches=branches, branch_dim=4)
    sd = VAR(cfg).state_dict()
    buf = io.BytesIO()
    torch.save({"epoch": 1, "args": {"pn": "_".join(map(str, patch_nums)), "product_quant": branches},
                "trainer": {"config": {"patch_nums": list(patch_nums)}, "var_wo_ddp": sd}}, buf)
    return buf.getvalue()
