"""Data layer: image sources (folders, file lists, WebDataset shards), preprocessing, token files.

See :mod:`xqtool.data.images` (image streams and the bad-file policy), :mod:`xqtool.data.sources`
(what a source can be), :mod:`xqtool.data.transforms` (spec 5.7 preprocessing),
:mod:`xqtool.data.shards` (WebDataset read/write) and :mod:`xqtool.data.tokens` (token files + manifest).

Owns reading and writing images, shards and token files (with their manifests). May import ``errors``,
``fsutil`` and ``checkpoints`` (weights fingerprints for token manifests); never ``tasks``, ``training`` or ``cli``.
"""

from xqtool.data.images import ImageLoader, ImageStream, make_loader, open_image_source
from xqtool.data.tokens import (
    TokenManifest,
    check_manifest,
    check_token_rows,
    load_tokens,
    token_dataset,
    token_dtype,
    write_tokens,
)

__all__ = [
    "ImageLoader",
    "ImageStream",
    "TokenManifest",
    "check_manifest",
    "check_token_rows",
    "load_tokens",
    "make_loader",
    "open_image_source",
    "token_dataset",
    "token_dtype",
    "write_tokens",
]
