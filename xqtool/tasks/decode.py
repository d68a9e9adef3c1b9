"""`xqtool decode`: token ids (``.npy`` + manifest, or a token-shard folder) -> PNG images.

Each row becomes ``DIR/<key>.png`` (keys with '/' make sub-folders). The tokens' manifest must match
the tokenizer (TokenError naming the first differing field); ids out of range or rows of the wrong
length raise TokenError naming the row. With ``progressive``, ``DIR/<key>.progressive.png`` is a strip
of coarse-to-fine reconstructions: columns = scales (coarse -> fine), rows = all branches, then each
branch alone (branch 0 first).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from xqtool.data.tokens import (
    DIR_MANIFEST,
    TokenManifest,
    _iter_token_samples,
    _token_shards,
    check_manifest,
    check_token_rows,
    load_tokens,
)
from xqtool.errors import ConfigError, TokenError
from xqtool.fsutil import atomic_write_bytes, check_output, fresh_output_dir, output_lock
from xqtool.metrics import to_uint8_hwc
from xqtool.runtime import amp_dtype, autocast
from xqtool.tasks.injected import Injected

log = logging.getLogger(__name__)

@dataclass
class DecodeResult:
    """Outcome of :func:`decode_tokens`: the PNGs written (one per token row) and the progressive strips."""

    out_dir: Path
    files: List[Path] = field(default_factory=list)
    progressive_files: List[Path] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of images decoded (= PNG files written, strips not counted)."""
        return len(self.files)


def png_relpath(key: str, suffix: str = ".png") -> Path:
    """Safe relative output path for a key: no absolute paths, no '..', '/' -> sub-folders."""
    parts = [p for p in PurePosixPath(key.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    if not parts:
        parts = ["image"]
    parts = [p.replace(":", "_") for p in parts]
    return Path(*parts[:-1], parts[-1] + suffix)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _batches(path: Path, manifest: TokenManifest, batch_size: int) -> Iterator[Tuple[int, np.ndarray, List[str]]]:
    """-> (first_row, tokens [b, P, L], keys) in file order; never loads a whole shard folder."""
    if path.is_dir():
        row, buf, keys = 0, [], []
        for url in _token_shards(path, manifest):
            for s in _iter_token_samples(url):
                buf.append(s["tokens"])
                keys.append(s["key"])
                if len(buf) == batch_size:
                    yield row, _stack_rows(buf, row, keys), keys
                    row, buf, keys = row + len(buf), [], []
        if buf:
            yield row, _stack_rows(buf, row, keys), keys
        return
    arr, manifest = load_tokens(path)
    keys_all = manifest.keys or [str(i) for i in range(arr.shape[0])]
    for i in range(0, arr.shape[0], batch_size):
        yield i, np.asarray(arr[i : i + batch_size]), keys_all[i : i + batch_size]


def _stack_rows(rows: List[np.ndarray], first: int, keys: List[str]) -> np.ndarray:
    shape = rows[0].shape
    for j, r in enumerate(rows):
        if r.shape != shape:
            raise TokenError(f"row {first + j} (key {keys[j]!r}) has shape {list(r.shape)}, expected {list(shape)}")
    return np.stack(rows)


def _strip(panels: List[List[np.ndarray]]) -> np.ndarray:
    """panels[row][col] uint8 [S, S, 3] -> one image [rows*S, cols*S, 3]."""
    return np.concatenate([np.concatenate(r, axis=1) for r in panels], axis=0)


@dataclass(kw_only=True)
class DecodeSettings:
    """One ``xqtool decode`` run (see :func:`decode_tokens`).

    Attributes:
        tokens: token file (``.npy`` with its ``.npy.json``) or token-shard folder from ``xqtool encode``.
        out_dir: folder for the PNGs; overwrite: replace an earlier decode output there.
        ckpt / config: the tokenizer that encoded the tokens (required unless a tokenizer is injected).
        device: None = CUDA when available, else CPU; precision: ``fp32 | bf16 | fp16`` autocast.
        progressive: also write ``KEY.progressive.png`` (columns = scales; rows = all branches, then each alone).
        ignore_fingerprint: accept tokens made with other tokenizer weights (with a warning).
    """

    tokens: Union[str, Path]
    out_dir: Union[str, Path]
    ckpt: Optional[Union[str, Path]] = None
    config: Optional[Union[str, Path]] = None
    batch_size: int = 32
    device: Optional[str] = None
    precision: str = "fp32"
    progressive: bool = False
    overwrite: bool = False
    ignore_fingerprint: bool = False


def decode_tokens(settings: DecodeSettings, injected: Optional[Injected] = None) -> DecodeResult:
    """Decode every row of ``settings.tokens`` to ``out_dir/<key>.png`` (see module docstring).

    Reads ``injected.tokenizer`` (used instead of loading ``settings.ckpt``), ``injected.progress`` (called with
    the number of images just written) and ``injected.on_start`` (called once with the number of rows).

    Raises TokenError when the tokens' manifest does not match the tokenizer (config or weights fingerprint;
    ``ignore_fingerprint`` accepts other weights with a warning), OutputError when `out_dir` exists and is not
    empty (``overwrite`` replaces only an earlier decode output), lies inside / contains the tokens, or is
    being written by another process; ConfigError for a bad precision or a missing tokenizer.
    """
    s, injected = settings, injected or Injected()
    amp_dtype(s.precision)
    path = Path(s.tokens)
    if path.is_dir():
        manifest = TokenManifest.load(path / DIR_MANIFEST)
        _token_shards(path, manifest)  # every shard present and intact before anything is written
    else:
        _, manifest = load_tokens(path)
    dev = torch.device(s.device) if s.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = injected.tokenizer
    if tokenizer is None:
        if s.ckpt is None:
            raise ConfigError("--tokenizer/-t is required: give the tokenizer checkpoint that encoded these tokens")
        from xqtool.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(s.ckpt, config=s.config, map_location=dev)
    tok = tokenizer.to(dev).eval()
    check_manifest(manifest, tok, ignore_fingerprint=s.ignore_fingerprint, what=f"the tokens {path}")
    out = Path(s.out_dir)
    replace = check_output(out, kind="decode", is_dir=True, overwrite=s.overwrite, sources=[path])
    with output_lock(out), fresh_output_dir(out, "decode", replace=replace):
        return _decode_into(s, injected, out, path, manifest, tok, dev)


def _decode_into(s: DecodeSettings, injected: Injected, out: Path, path: Path, manifest: TokenManifest, tok: Any,
                 dev: torch.device) -> DecodeResult:
    if injected.on_start is not None:
        injected.on_start(manifest.count or None)
    result = DecodeResult(out)
    P, L, K = tok.num_branches, tok.tokens_per_branch, tok.codebook_size
    for first, arr, keys in _batches(path, manifest, s.batch_size):
        check_token_rows(arr, P, L, K, keys=keys, first_row=first)
        ids = torch.from_numpy(arr.astype(np.int64)).to(dev)
        with torch.inference_mode(), autocast(dev, s.precision):
            images = to_uint8_hwc(tok.decode_each(ids))  # one image at a time: PNGs independent of -b
            strips = None
            if s.progressive:  # per image: [row][scale] -> [S,S,3]; rows = all branches, then each branch
                strips = [[[to_uint8_hwc(img)[0] for img in tok.decode_progressive(ids[j : j + 1], branches=br)]
                           for br in [None] + [[b] for b in range(P)]] for j in range(ids.shape[0])]
        for j, key in enumerate(keys):
            target = out / png_relpath(key)
            atomic_write_bytes(target, _png_bytes(images[j]))
            result.files.append(target)
            if strips is not None:
                strip = _strip(strips[j])
                ptarget = out / png_relpath(key, ".progressive.png")
                atomic_write_bytes(ptarget, _png_bytes(strip))
                result.progressive_files.append(ptarget)
        if injected.progress is not None:
            injected.progress(len(keys))
    return result
