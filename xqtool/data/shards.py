"""WebDataset shards: read image samples as :class:`RawRecord`, write image and token shards.

Sample layout read: ``__key__``, one image member ``jpg`` / ``jpeg`` / ``png`` / ``webp`` (first present
wins), optional ``cls`` (integer text) and ``json`` (metadata). Reading errors (missing or truncated
shards, duplicate members) and members without an image become records with ``error`` set, so the
bad-file policy of :mod:`xqtool.data.images` can skip-and-report or fail on them by name.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import webdataset as wds

from xqtool.data.sources import RawRecord

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def shard_key(key: str) -> str:
    """Make `key` safe as a WebDataset ``__key__``: dots (the extension separator) become '_'."""
    parts = key.replace("\\", "/").split("/")
    return "/".join(p.replace(".", "_") for p in parts if p not in ("", ".", ".."))


def _url_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _exn_message(exn: BaseException) -> str:
    first = exn.args[0] if exn.args else ""
    msg = f"{type(exn).__name__}: {first}" if first else type(exn).__name__
    return msg.split("\n")[0][:300]


def _sample_record(url: str, sample: Dict[str, Any]) -> RawRecord:
    key = str(sample.get("__key__", "?"))
    name = f"{url}#{key}"
    label = -1
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                meta = {"value": meta}
        except (ValueError, UnicodeDecodeError):
            return RawRecord(key, -1, name, None, "bad shard member: json is not valid JSON")
    if "cls" in sample:
        try:
            label = int(bytes(sample["cls"]).decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return RawRecord(key, -1, name, None, "bad shard member: cls is not an integer")
    for ext in IMAGE_KEYS:
        if ext in sample:
            return RawRecord(key, label, name, bytes(sample[ext]), None, meta)
    present = ",".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
    return RawRecord(key, label, name, None, f"bad shard member: no image (jpg/jpeg/png/webp), has {present}", meta)


def iter_shard_records(url: str) -> Iterator[RawRecord]:
    """Read one shard (local path or URL) -> RawRecord per sample, in shard order.

    Unreadable shards, truncated archives and malformed members are yielded as records with
    ``error`` set (name = the shard URL), never raised.
    """
    errors: List[BaseException] = []

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    def drain() -> Iterator[RawRecord]:
        while errors:
            exn = errors.pop(0)
            yield RawRecord(f"{_url_name(url)}#error", -1, url, None, f"bad shard: {_exn_message(exn)}")

    for sample in wds.tarfile_samples([{"url": url}], handler=handler):
        yield from drain()
        yield _sample_record(url, sample)
    yield from drain()


def shard_url_stream(
    urls: Sequence[str],
    *,
    train: bool,
    resample: bool,
    seed: int,
    epoch: int,
    split_nodes: bool = True,
) -> Iterator[str]:
    """Shard URLs for this node and DataLoader worker.

    Evaluation: fixed order, split by node then by worker. Training: shuffled per epoch
    (``seed``, ``epoch``) then split; with ``resample`` an endless ``wds.ResampledShards`` stream
    (independently seeded per node and worker, deterministic given ``seed`` and ``epoch``).
    ``split_nodes=False``: every process reads all shards (split by DataLoader worker only).
    """
    if resample:
        rs = wds.ResampledShards(list(urls), seed=seed + 1000003 * epoch, deterministic=True)
        for d in rs:
            yield d["url"]
        return
    order = list(urls)
    if train:
        random.Random(seed * 1000003 + epoch).shuffle(order)
    dicts = ({"url": u} for u in order)
    for d in wds.split_by_worker(wds.split_by_node(dicts) if split_nodes else dicts):
        yield d["url"]


def warn_if_few_shards(num_shards: int, num_nodes: int, num_workers: int) -> Optional[str]:
    """Return (and log) a warning when there are fewer shards than nodes x workers."""
    need = max(1, num_nodes) * max(1, num_workers)
    if num_shards < need:
        msg = (
            f"only {num_shards} shards for {num_nodes} node(s) x {num_workers} worker(s) = {need} readers: "
            f"some readers get no data; write more, smaller shards (lower --maxcount)"
        )
        log.warning(msg)
        return msg
    return None


def npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise an array in .npy format (what WebDataset's 'npy' decoder reads)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_from_bytes(data: bytes) -> np.ndarray:
    """Inverse of :func:`npy_bytes` (never unpickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_token_shard(path: Path, samples: Iterable[Dict[str, Any]]) -> int:
    """Write token samples to a tar at `path` (caller handles atomicity) -> number written.

    Each sample: ``{"key": str, "tokens": int array [P, L], "label": int, "meta": dict}`` stored as
    ``__key__`` (sanitised), ``npy``, ``cls``, ``json``.
    """
    n = 0
    with wds.TarWriter(str(path), encoder=False, format="PAX_FORMAT") as sink:
        for s in samples:
            sink.write(
                {
                    "__key__": shard_key(s["key"]),
                    "npy": npy_bytes(s["tokens"]),
                    "cls": str(int(s["label"])).encode("ascii"),
                    "json": json.dumps(s.get("meta", {}), sort_keys=True).encode("utf-8"),
                }
            )
            n += 1
    return n


def iter_token_shard(url: str) -> Iterator[Dict[str, Any]]:
    """Read a token shard -> ``{"key", "tokens" [P, L] int array, "label", "meta"}`` per sample.

    Raises ValueError on malformed members (callers turn it into TokenError).
    """
    for sample in wds.tarfile_samples([{"url": url}]):
        if "npy" not in sample:
            raise ValueError(f"{url}#{sample.get('__key__')}: token sample without 'npy'")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        label = int(bytes(sample["cls"]).decode("ascii").strip()) if "cls" in sample else -1
        yield {
            "key": meta.get("key", sample["__key__"]),
            "tokens": npy_from_bytes(sample["npy"]),
            "label": label,
            "meta": meta,
        }
