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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

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
from xqtool.data.transforms import to_uint8
from xqtool.errors import ConfigError, TokenError
from xqtool.fsutil import atomic_write_bytes, check_output, fresh_output_dir, output_lock

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DecodeResult:
    """Outcome of :func:`decode_tokens`."""

    out_dir: Path
    count: int
    files: List[Path] = field(default_factory=list)
    progressive_files: List[Path] = field(default_factory=list)


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


def decode_tokens(
    tokens: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    ckpt: Optional[Union[str, Path]] = None,
    config: Optional[Union[str, Path]] = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    device: Optional[str] = None,
    precision: str = "fp32",
    progressive: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    on_start: Optional[Callable[[Optional[int]], None]] = None,
    overwrite: bool = False,
    ignore_fingerprint: bool = False,
) -> DecodeResult:
    """Decode every row of `tokens` to ``out_dir/<key>.png`` (see module docstring).

    Raises TokenError when the tokens' manifest does not match the tokenizer (config or weights fingerprint;
    ``ignore_fingerprint`` accepts other weights with a warning), OutputError when `out_dir` exists and is not
    empty (``overwrite`` replaces only an earlier decode output), lies inside / contains the tokens, or is
    being written by another process.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be fp32, bf16 or fp16, not {precision!r}")
    path = Path(tokens)
    if path.is_dir():
        manifest = TokenManifest.load(path / DIR_MANIFEST)
        _token_shards(path, manifest)  # every shard present and intact before anything is written
    else:
        _, manifest = load_tokens(path)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tokenizer is None:
        if ckpt is None:
            raise ConfigError("--tokenizer/-t is required: give the tokenizer checkpoint that encoded these tokens")
        from xqtool.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(ckpt, config=config, map_location=dev)
    tok = tokenizer.to(dev).eval()
    check_manifest(manifest, tok, ignore_fingerprint=ignore_fingerprint, what=f"the tokens {path}")
    out = Path(out_dir)
    replace = check_output(out, kind="decode", is_dir=True, overwrite=overwrite, sources=[path])
    with output_lock(out), fresh_output_dir(out, "decode", replace=replace):
        return _decode_into(out, path, manifest, tok, dev, batch_size, precision, progressive, progress, on_start)


def _decode_into(out: Path, path: Path, manifest: TokenManifest, tok: Any, dev: torch.device, batch_size: int,
                 precision: str, progressive: bool, progress: Optional[Callable[[int], None]],
                 on_start: Optional[Callable[[Optional[int]], None]]) -> DecodeResult:
    if on_start is not None:
        on_start(manifest.count or None)
    amp_dtype = PRECISIONS[precision]
    result = DecodeResult(out, 0)
    P, L, K = tok.num_branches, tok.tokens_per_branch, tok.codebook_size
    for first, arr, keys in _batches(path, manifest, batch_size):
        check_token_rows(arr, P, L, K, keys=keys, first_row=first)
        ids = torch.from_numpy(arr.astype(np.int64)).to(dev)
        amp = torch.autocast(device_type=dev.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with torch.inference_mode(), amp:
            images = to_uint8(tok.decode_each(ids))  # one image at a time: PNGs independent of -b
            strips = None
            if progressive:  # per image: [row][scale] -> [S,S,3]; rows = all branches, then each branch
                strips = [[[to_uint8(img)[0] for img in tok.decode_progressive(ids[j : j + 1], branches=br)]
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
        result.count += len(keys)
        if progress is not None:
            progress(len(keys))
    return result
