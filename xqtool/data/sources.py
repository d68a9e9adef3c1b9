"""Resolve a user-given image source into either a list of files or a list of WebDataset shard URLs.

Accepted sources (see :func:`resolve_source`):

* a torchvision-style class tree ``root/<class>/**/*.png`` (labels = index of the sorted class names);
* a flat folder of images (searched recursively, label -1);
* a folder holding ``*.tar`` WebDataset shards;
* a text file listing one image path per line (relative paths are relative to the list file; an optional
  trailing integer is the label; ``#`` comments and blank lines are ignored);
* a single image file;
* WebDataset shards: a local ``.tar`` path, a brace pattern (``shards/train-{000000..000127}.tar``),
  ``::``-separated lists, ``http(s)://``, ``pipe:``, ``gs://`` or ``s3://`` URLs;
* a Python list of image paths.

Folders are walked following folder symlinks, but each real folder is read once (symlink loops end) and
each real file is listed once (the first path found, in sorted order); folders that cannot be read
become bad inputs named ``<folder>`` with the reason, under the bad-file policy.

Keys: for folders, the path relative to the root without its extension (POSIX separators); for file
lists, the path relative to the deepest common folder of the listed files; for shards, ``__key__``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Set, Tuple, Union

from xqtool.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
URL_PREFIXES = ("http://", "https://", "pipe:", "gs://", "s3://", "file:")
#: File names inside image folders that are never reported as "not an image" (our own outputs, OS litter).
IGNORED_NAMES = frozenset({"skipped.txt", "shards.json", "Thumbs.db", "desktop.ini"})

SourceLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass(frozen=True)
class FileItem:
    """One image file of a folder / list source.

    `error` is set (and the file never opened) when the source already knows the entry is bad,
    e.g. a non-image file inside an image folder or a listed path that does not exist.
    """

    path: str
    key: str
    label: int = -1
    error: Optional[str] = None


@dataclass
class RawRecord:
    """One undecoded sample of any source: the image bytes (or why there are none) plus its labels.

    `name` identifies the sample in reports: the file path, or ``<shard url>#<key>`` for shard members.
    """

    key: str
    label: int
    name: str
    data: Optional[bytes] = None
    error: Optional[str] = None
    meta: dict = field(default_factory=dict)


@dataclass
class SourceSpec:
    """A resolved source: ``kind`` 'files' (``items``) or 'shards' (``urls``)."""

    kind: str
    description: str
    items: List[FileItem] = field(default_factory=list)
    urls: List[str] = field(default_factory=list)
    classes: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.items) if self.kind == "files" else len(self.urls)


def file_records(items: Sequence[FileItem]) -> Iterator[RawRecord]:
    """Read the bytes of each file item -> RawRecord (read failures become records with `error`)."""
    for it in items:
        if it.error is not None:
            yield RawRecord(it.key, it.label, it.path, None, it.error)
            continue
        try:
            with open(it.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            yield RawRecord(it.key, it.label, it.path, None, f"cannot read file: {exc.strerror or exc}")
            continue
        yield RawRecord(it.key, it.label, it.path, data, None)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSIONS)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _walk_files(root: Path) -> Tuple[List[Path], List[Tuple[Path, str]]]:
    """All non-hidden files under `root` (following folder symlinks, each real folder visited once)
    -> (files, [(unreadable folder, reason)])."""
    out: List[Path] = []
    errors: List[Tuple[Path, str]] = []
    seen: Set[str] = set()

    def onerror(exc: OSError) -> None:
        errors.append((Path(exc.filename or root), f"cannot read folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=onerror):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back into the tree (loop) or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name in IGNORED_NAMES:
                continue
            out.append(Path(dirpath) / name)
    return out, errors


def _unique_real_paths(items: List[FileItem]) -> List[FileItem]:
    """Drop items whose file (after resolving symlinks) was already listed; the first one is kept."""
    seen: Set[str] = set()
    out = []
    for it in items:
        real = os.path.realpath(it.path) if it.error is None else f"\0{it.path}"
        if real in seen:
            continue
        seen.add(real)
        out.append(it)
    return out


def _key_for(rel: Path) -> str:
    return rel.with_suffix("").as_posix()


def _dedupe_keys(items: List[FileItem]) -> List[FileItem]:
    """Make keys unique: a second file with the same stem keeps its extension ('a_jpg')."""
    seen: dict = {}
    out = []
    for it in items:
        key = it.key
        if key in seen:
            key = f"{key}_{Path(it.path).suffix.lstrip('.').lower()}"
            n = 2
            base = key
            while key in seen:
                key = f"{base}{n}"
                n += 1
        seen[key] = True
        out.append(FileItem(it.path, key, it.label, it.error) if key != it.key else it)
    return out


def _folder_items(root: Path, label: int, key_root: Path) -> List[FileItem]:
    items = []
    files, unreadable = _walk_files(root)
    for path in files:
        rel = path.relative_to(key_root)
        if _hidden(rel):
            continue
        error = None if _is_image(path) else "not an image file (unknown extension)"
        items.append(FileItem(str(path), _key_for(rel), label, error))
    for path, reason in unreadable:
        items.append(FileItem(str(path), _key_for(path.relative_to(key_root)) + "/", label, reason))
    return items


def _resolve_dir(root: Path) -> SourceSpec:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    top_images = [p for p in entries if p.is_file() and _is_image(p)]
    subdirs = [p for p in entries if p.is_dir()]
    shards = [p for p in entries if p.is_file() and _is_shard_name(p.name)]
    if not top_images and shards and not subdirs:
        return SourceSpec("shards", f"{len(shards)} shards in {root}", urls=[str(p) for p in shards])
    if top_images or not subdirs:
        items = _dedupe_keys(_unique_real_paths(_folder_items(root, -1, root)))
        return SourceSpec("files", f"image folder {root}", items=items)
    classes = [p.name for p in subdirs]
    items: List[FileItem] = []
    for label, sub in enumerate(subdirs):
        items.extend(_folder_items(sub, label, root))
    # stray non-image files at the top of a class tree are reported too
    for p in entries:
        if p.is_file() and p.name not in IGNORED_NAMES:
            items.append(FileItem(str(p), _key_for(p.relative_to(root)), -1, "not an image file (outside class folders)"))
    return SourceSpec(
        "files", f"class tree {root} ({len(classes)} classes)", items=_dedupe_keys(_unique_real_paths(items)),
        classes=classes,
    )


def _parse_list_line(line: str, base: Path) -> tuple:
    """-> (path, label) for one non-empty line of a file list."""
    def absolute(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    whole = absolute(line)
    if whole.exists():
        return whole, -1
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            label = int(parts[1])
        except ValueError:
            return whole, -1
        return absolute(parts[0]), label
    return whole, -1


def _items_from_paths(paths: List[tuple]) -> List[FileItem]:
    """[(Path, label)] -> FileItems keyed relative to the deepest common folder."""
    if not paths:
        return []
    parents = [str(p.resolve().parent) for p, _ in paths]
    try:
        common = Path(os.path.commonpath(parents))
    except ValueError:  # different drives
        common = None
    items = []
    for p, label in paths:
        rp = p.resolve()
        rel = rp.relative_to(common) if common is not None else Path(rp.name)
        error = None
        if not p.exists():
            error = "file not found"
        elif not p.is_file():
            error = "not a file"
        elif not _is_image(p):
            error = "not an image file (unknown extension)"
        items.append(FileItem(str(p), _key_for(rel), label, error))
    return _dedupe_keys(items)


def _resolve_list_file(path: Path) -> SourceSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read file list {path}: {exc}") from None
    pairs = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pairs.append(_parse_list_line(line, path.parent))
    return SourceSpec("files", f"file list {path}", items=_items_from_paths(pairs))


def expand_shard_urls(source: str) -> List[str]:
    """Expand a brace pattern / '::' list into shard URLs (webdataset's own expansion)."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(source))


def looks_like_shards(source: str) -> bool:
    """True for URLs, brace patterns and ``.tar`` paths."""
    s = str(source)
    if s.startswith(URL_PREFIXES):
        return True
    if "::" in s or ("{" in s and ".." in s and "}" in s):
        return True
    return _is_shard_name(s)


def resolve_source(source: SourceLike) -> SourceSpec:
    """Resolve `source` (see module docstring) -> :class:`SourceSpec`.

    Raises DataError for a missing path, an unknown kind of file, or a source with nothing in it.
    """
    if isinstance(source, (list, tuple)):
        pairs = [(Path(p), -1) for p in source]
        spec = SourceSpec("files", f"{len(pairs)} listed images", items=_items_from_paths(pairs))
    else:
        s = os.fspath(source)
        path = Path(s).expanduser()
        if path.is_dir():
            spec = _resolve_dir(path)
        elif path.is_file() and _is_image(path):
            spec = SourceSpec("files", f"image {path}", items=[FileItem(str(path), path.stem, -1)])
        elif path.is_file() and _is_shard_name(path.name):
            spec = SourceSpec("shards", f"shard {path}", urls=[str(path)])
        elif path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list", ".csv"):
            spec = _resolve_list_file(path)
        elif path.is_file():
            raise DataError(
                f"don't know how to read {s}: give an image folder, a .txt file list, an image, or .tar shards"
            )
        elif looks_like_shards(s):
            urls = expand_shard_urls(s)
            local_missing = [u for u in urls if not u.startswith(URL_PREFIXES) and not Path(u).exists()]
            if local_missing:
                raise DataError(
                    f"{len(local_missing)} of {len(urls)} shards do not exist, first: {local_missing[0]} (check the pattern)"
                )
            spec = SourceSpec("shards", f"{len(urls)} shards {s}", urls=urls)
        else:
            raise DataError(f"image source not found: {s}")
    if len(spec) == 0 or (spec.kind == "files" and all(it.error for it in spec.items)):
        raise DataError(f"no images in {spec.description}: point to a folder, list or shards that contain images")
    return spec
