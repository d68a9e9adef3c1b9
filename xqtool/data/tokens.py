"""Token files: ``.npy`` arrays or WebDataset token shards, each with a JSON manifest.

Layouts
-------
* ``tokens.npy`` + ``tokens.npy.json``: one int16/int32 array [N, P, L] (int16 when the codebook
  size K <= 32768, else int32; P product branches in checkpoint order, semantic branch last; L = sum of
  scale**2 over scales coarse -> fine, each scale row-major). The manifest lists, per row in order,
  ``keys``, ``paths`` and ``labels``.
* ``DIR/`` with ``tokens-000000.tar`` ... + ``DIR/manifest.json``: token shards, one sample per row with
  ``__key__`` (the source key, dots replaced by '_'), ``npy`` (int array [P, L]), ``cls`` (label) and
  ``json`` (``{"key", "path", "label", "view"}``). The manifest lists ``shards`` with their counts.

Public API: :class:`TokenManifest`, :func:`write_tokens`, :func:`load_tokens`, :func:`token_dataset`,
:func:`check_manifest`, :func:`check_token_rows`, :func:`token_dtype`, :func:`manifest_path`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset

from xqtool import __version__
from xqtool.data.transforms import EVAL_PREPROCESSING
from xqtool.errors import TokenError
from xqtool.fsutil import atomic_path, atomic_write_text, checksums_enabled, file_sha256

FORMAT_VERSION = 1
TOKEN_LAYOUT = "[N, P, L]: branches in checkpoint order (semantic last); scales coarse->fine; each scale row-major"
DIR_MANIFEST = "manifest.json"

PathLike = Union[str, os.PathLike]


def token_dtype(codebook_size: int) -> np.dtype:
    """Smallest sufficient dtype: int16 when K <= 32768, else int32."""
    return np.dtype(np.int16) if int(codebook_size) <= 32768 else np.dtype(np.int32)


def manifest_path(path: PathLike) -> Path:
    """Manifest location: ``X.npy.json`` beside a ``.npy`` file, ``DIR/manifest.json`` for a shard dir."""
    p = Path(path)
    if p.suffix == ".npy":
        return p.with_name(p.name + ".json")
    return p / DIR_MANIFEST


@dataclass
class TokenManifest:
    """What made a token file, and what each row is."""

    config_hash: str
    scales: List[int]
    num_branches: int
    codebook_size: int
    tokens_per_branch: int
    image_size: int
    count: int = 0
    dtype: str = "int16"
    checkpoint: str = ""
    preprocessing: str = EVAL_PREPROCESSING
    augmentation: str = "none"
    views: int = 1
    source: str = ""
    classes: Optional[List[str]] = None
    keys: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    shards: List[Dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    weights_fingerprint: str = ""
    sha256: str = ""
    tokenizer_config: Dict[str, Any] = field(default_factory=dict)
    layout: str = TOKEN_LAYOUT
    format_version: int = FORMAT_VERSION
    xqtool_version: str = __version__

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, checkpoint: str = "", **kw: Any) -> "TokenManifest":
        """Manifest describing `tokenizer` (an XQTokenizer); extra fields via keyword."""
        from xqtool.checkpoints import weights_fingerprint

        kw.setdefault("weights_fingerprint", weights_fingerprint(tokenizer))
        return cls(
            config_hash=tokenizer.config_hash(),
            scales=[int(s) for s in tokenizer.scales],
            num_branches=int(tokenizer.num_branches),
            codebook_size=int(tokenizer.codebook_size),
            tokens_per_branch=int(tokenizer.tokens_per_branch),
            image_size=int(tokenizer.image_size),
            dtype=token_dtype(tokenizer.codebook_size).name,
            checkpoint=str(checkpoint),
            tokenizer_config=tokenizer.config_dict(),
            **kw,
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "manifest") -> "TokenManifest":
        if not isinstance(d, dict):
            raise TokenError(f"{where} is not a JSON object")
        version = int(d.get("format_version", 0) or 0)
        if version > FORMAT_VERSION:
            raise TokenError(
                f"{where} has format_version {version}, newer than this xqtool ({FORMAT_VERSION}): upgrade xqtool"
            )
        required = ("config_hash", "scales", "num_branches", "codebook_size", "tokens_per_branch", "image_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise TokenError(f"{where} lacks {', '.join(missing)}: it was not written by xqtool encode")
        ints = ("num_branches", "codebook_size", "tokens_per_branch", "image_size", "count", "views", "skipped")
        bad = [k for k in ints if k in d and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 0)]
        lists = ("scales", "keys", "paths", "labels", "shards")
        bad += [k for k in lists if k in d and not isinstance(d[k], list)]
        bad += [k for k in ("config_hash", "weights_fingerprint", "dtype", "checkpoint") if k in d
                and not isinstance(d[k], str)]
        if not bad and not all(isinstance(x, int) and x > 0 for x in d["scales"]):
            bad.append("scales")
        if not bad and not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in d.get("shards", [])):
            bad.append("shards")
        if not bad and d.get("labels") and not all(isinstance(x, int) for x in d["labels"]):
            bad.append("labels")
        if bad:
            raise TokenError(f"{where} is corrupt: field {bad[0]!r} has an invalid value")
        n_keys = len(d.get("keys") or [])
        for k in ("paths", "labels"):
            if d.get(k) and n_keys and len(d[k]) != n_keys:
                raise TokenError(f"{where} is corrupt: {len(d[k])} {k} for {n_keys} keys")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: PathLike) -> None:
        """Write the manifest JSON atomically, with its own checksum (``manifest_sha256``)."""
        d = self.to_dict()
        d["manifest_sha256"] = _manifest_digest(d)
        atomic_write_text(path, json.dumps(d, indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: PathLike) -> "TokenManifest":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenError(f"token manifest {p} not found: tokens need the manifest written by xqtool encode") from None
        except (OSError, ValueError) as exc:
            raise TokenError(f"cannot read token manifest {p}: {' '.join(str(exc).split())[:160]}") from None
        if isinstance(d, dict) and d.get("manifest_sha256") and d["manifest_sha256"] != _manifest_digest(d):
            raise TokenError(f"token manifest {p} is corrupt: its content does not match its checksum")
        return cls.from_dict(d, where=str(p))


def _manifest_digest(d: Dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own checksum field."""
    import hashlib

    body = {k: v for k, v in d.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def write_tokens(path: PathLike, tokens: np.ndarray, manifest: TokenManifest) -> TokenManifest:
    """Write ``tokens`` [N, P, L] to ``path`` (.npy) plus ``path.json``, both atomically.

    The array is cast to :func:`token_dtype` of the manifest's codebook size; ``count`` and ``dtype``
    of the manifest are filled in. Returns the manifest written.
    """
    p = Path(path)
    if p.suffix != ".npy":
        raise TokenError(f"token file must end in .npy, not {p.name}")
    arr = np.asarray(tokens)
    check_token_rows(arr, manifest.num_branches, manifest.tokens_per_branch, manifest.codebook_size, manifest.keys)
    dt = token_dtype(manifest.codebook_size)
    manifest.count = int(arr.shape[0])
    manifest.dtype = dt.name
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr.astype(dt, copy=False), allow_pickle=False)
        manifest.sha256 = file_sha256(tmp)
    manifest.save(manifest_path(p))
    return manifest


def _token_shards(directory: Path, manifest: TokenManifest) -> List[str]:
    if manifest.shards:
        names = [s["name"] for s in manifest.shards]
    else:
        names = sorted(p.name for p in directory.glob("*.tar"))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise TokenError(f"token shard {directory / missing[0]} is missing (re-run xqtool encode to finish it)")
    for entry in manifest.shards:
        if entry.get("sha256") and checksums_enabled() and file_sha256(directory / entry["name"]) != entry["sha256"]:
            raise TokenError(f"token shard {directory / entry['name']} is corrupt: its bytes do not match the checksum "
                             "in the manifest")
    return [str(directory / n) for n in names]


def _open(path: PathLike) -> tuple:
    p = Path(path)
    if p.is_dir():
        return p, TokenManifest.load(p / DIR_MANIFEST)
    if not p.exists():
        raise TokenError(f"token file {p} not found")
    if p.suffix != ".npy":
        raise TokenError(f"{p} is not a token file: give a .npy file or a token-shard folder made by xqtool encode")
    return p, TokenManifest.load(manifest_path(p))


def load_tokens(path: PathLike) -> tuple:
    """Load tokens -> (np.ndarray [N, P, L] int16/int32, TokenManifest).

    ``.npy`` files are memory-mapped (read-only); a token-shard folder is read whole into memory (for
    streaming use :func:`token_dataset`). Raises TokenError when the file or manifest is missing or
    they disagree.
    """
    p, manifest = _open(path)
    if p.is_dir():
        rows, keys, labels, paths = [], [], [], []
        for url in _token_shards(p, manifest):
            for s in _iter_token_samples(url):
                rows.append(s["tokens"])
                keys.append(s["key"])
                labels.append(s["label"])
                paths.append(s["meta"].get("path", ""))
        shape = (0, manifest.num_branches, manifest.tokens_per_branch)
        arr = np.stack(rows) if rows else np.zeros(shape, dtype=token_dtype(manifest.codebook_size))
        manifest.keys, manifest.labels, manifest.paths = keys, labels, paths
    else:
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            if manifest.sha256 and checksums_enabled() and file_sha256(p) != manifest.sha256:
                raise TokenError(f"{p} is corrupt: its bytes do not match the checksum in its manifest "
                                 "(truncated, modified, or from another encode)")
        except (OSError, ValueError, EOFError) as exc:
            raise TokenError(f"{p} is truncated or not a token array ({' '.join(str(exc).split())[:160]})") from None
        if manifest.dtype and arr.dtype.name != manifest.dtype:
            raise TokenError(f"{p} holds {arr.dtype.name} but its manifest says {manifest.dtype}: the files do not belong together")
    expect = (manifest.num_branches, manifest.tokens_per_branch)
    if arr.ndim != 3 or tuple(arr.shape[1:]) != expect:
        raise TokenError(
            f"{p} has shape {list(arr.shape)} but its manifest says [N, {expect[0]}, {expect[1]}]: the files do not belong together"
        )
    if manifest.keys and len(manifest.keys) != arr.shape[0]:
        raise TokenError(f"{p} has {arr.shape[0]} rows but its manifest lists {len(manifest.keys)} keys")
    manifest.count = int(arr.shape[0])
    return arr, manifest


def _iter_token_samples(url: str) -> Iterator[Dict[str, Any]]:
    from xqtool.data.shards import iter_token_shard

    try:
        yield from iter_token_shard(url)
    except (ValueError, KeyError, OSError, EOFError) as exc:
        raise TokenError(f"corrupt token shard {url}: {' '.join(str(exc).split())[:160]}") from None


class TokenArrayDataset(Dataset):
    """Map-style dataset over a ``.npy`` token file: item i -> {"tokens": LongTensor [P, L], "label": int, "key": str}."""

    def __init__(self, path: PathLike) -> None:
        self.tokens, self.manifest = load_tokens(path)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        m = self.manifest
        return {
            "tokens": torch.from_numpy(np.asarray(self.tokens[i], dtype=np.int64)),
            "label": int(m.labels[i]) if m.labels else -1,
            "key": m.keys[i] if m.keys else str(i),
        }


class TokenShardStream(IterableDataset):
    """Iterable dataset over a token-shard folder, split by node and worker.

    Items as :class:`TokenArrayDataset`. ``train`` shuffles shards per epoch and samples in a buffer;
    ``resample`` repeats forever.
    """

    def __init__(self, directory: PathLike, *, train: bool = False, seed: int = 0, resample: bool = False,
                 shuffle_buffer: int = 2000, split_nodes: bool = True) -> None:
        super().__init__()
        self.split_nodes = split_nodes  # False: every process reads the whole stream (train-var slices batches)
        self.directory = Path(directory)
        self.manifest = TokenManifest.load(self.directory / DIR_MANIFEST)
        self.urls = _token_shards(self.directory, self.manifest)
        self.train, self.seed, self.resample, self.shuffle_buffer = train, seed, resample, shuffle_buffer
        self.epoch = 0

    def __len__(self) -> int:
        return int(self.manifest.count)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _samples(self) -> Iterator[Dict[str, Any]]:
        from xqtool.data.shards import shard_url_stream

        epoch = self.epoch
        while True:
            for url in shard_url_stream(self.urls, train=self.train, resample=False, seed=self.seed, epoch=epoch,
                                        split_nodes=self.split_nodes):
                for s in _iter_token_samples(url):
                    yield {"tokens": torch.from_numpy(s["tokens"].astype(np.int64)), "label": s["label"], "key": s["key"]}
            if not self.resample:
                return
            epoch += 1

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if torch.utils.data.get_worker_info() is None:
            self.epoch += 1
        it = self._samples()
        if self.train and self.shuffle_buffer > 1:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rank = rank if self.split_nodes else 0
            rng = random.Random(f"tok-{self.seed}-{self.epoch}-{rank}-{worker}")
            it = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(it)
        return it


def token_dataset(path_or_dir: PathLike, *, train: bool = False, seed: int = 0, resample: bool = False,
                  split_nodes: bool = True) -> Dataset:
    """Tokens as a dataset of ``{"tokens": LongTensor [P, L], "label": int, "key": str}``.

    A ``.npy`` file gives a map-style :class:`TokenArrayDataset` (shuffle with a sampler); a
    token-shard folder gives a :class:`TokenShardStream` (IterableDataset; ``train`` / ``seed`` /
    ``resample`` control shuffling; ``split_nodes=False``: every process reads all shards). Both expose
    ``.manifest``.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        return TokenShardStream(p, train=train, seed=seed, resample=resample, split_nodes=split_nodes)
    return TokenArrayDataset(p)


def check_fingerprint(recorded: str, tokenizer: Any, what: str, ignore: bool = False) -> None:
    """TokenError when `recorded` (a weights fingerprint stored with tokens or a VAR) differs from `tokenizer`'s.

    Empty `recorded` (artefacts older than fingerprints) is accepted with a one-line warning; ``ignore``
    (``--ignore-fingerprint``) turns a mismatch into a warning.
    """
    import logging

    from xqtool.checkpoints import weights_fingerprint

    log = logging.getLogger("xqtool")
    ours = weights_fingerprint(tokenizer)
    if not recorded:
        log.warning("%s carries no tokenizer weights fingerprint (written by an older xqtool): cannot check that "
                    "the tokenizer's weights are the ones it was made with", what)
        return
    if recorded == ours:
        return
    msg = (f"{what} was made with tokenizer weights {recorded} but this tokenizer's weights are {ours} (same "
           f"config, other weights): use the tokenizer it was made with, or pass --ignore-fingerprint")
    if ignore:
        log.warning("%s (ignored: --ignore-fingerprint)", msg.split(": use the")[0])
        return
    raise TokenError(msg)


def check_manifest(manifest: TokenManifest, tokenizer: Any, ignore_fingerprint: bool = False,
                   what: str = "the tokens") -> None:
    """Raise TokenError naming the first field where `manifest` and `tokenizer` differ (weights fingerprint last)."""
    pairs = [
        ("codebook_size", manifest.codebook_size, int(tokenizer.codebook_size)),
        ("num_branches", manifest.num_branches, int(tokenizer.num_branches)),
        ("scales", [int(s) for s in manifest.scales], [int(s) for s in tokenizer.scales]),
        ("tokens_per_branch", manifest.tokens_per_branch, int(tokenizer.tokens_per_branch)),
        ("image_size", manifest.image_size, int(tokenizer.image_size)),
    ]

    def differ(name: str, theirs: Any, ours: Any) -> TokenError:
        return TokenError(
            f"tokens do not match the tokenizer: {name} is {theirs} in the tokens' manifest but {ours} in the "
            f"tokenizer (decode with the checkpoint that encoded them: {manifest.checkpoint or 'unknown'})"
        )

    for name, theirs, ours in pairs:
        if theirs != ours:
            raise differ(name, theirs, ours)
    ours = tokenizer.config_hash()
    if manifest.config_hash != ours:
        raise differ("config_hash", manifest.config_hash, ours)
    check_fingerprint(manifest.weights_fingerprint, tokenizer, what, ignore_fingerprint)


def check_token_rows(
    tokens: Union[np.ndarray, torch.Tensor],
    num_branches: int,
    tokens_per_branch: int,
    codebook_size: int,
    keys: Optional[Sequence[str]] = None,
    first_row: int = 0,
) -> None:
    """Raise TokenError when `tokens` is not [N, P, L] or holds ids outside [0, K), naming the row."""
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    P, L, K = int(num_branches), int(tokens_per_branch), int(codebook_size)
    if arr.ndim != 3 or arr.shape[1] != P or arr.shape[2] != L:
        row = ""
        if arr.ndim == 3 and arr.shape[0] > 0:
            row = f" (first row {first_row}{_key_note(keys, 0)})"
        raise TokenError(
            f"tokens have shape {list(arr.shape)}{row} but the tokenizer needs [N, {P}, {L}] "
            f"({P} branches x {L} tokens per branch)"
        )
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"tokens must be integers, not {arr.dtype}")
    bad = (arr < 0) | (arr >= K)
    if bad.any():
        i, b, j = (int(v) for v in np.argwhere(bad)[0])
        raise TokenError(
            f"row {first_row + i}{_key_note(keys, i)}: token id {int(arr[i, b, j])} at branch {b}, position {j} "
            f"is out of range [0, {K})"
        )


def _key_note(keys: Optional[Sequence[str]], i: int) -> str:
    if keys is not None and 0 <= i < len(keys):
        return f" (key {keys[i]!r})"
    return ""
