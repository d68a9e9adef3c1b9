"""Model registry and Hugging Face Hub references: ``MSVR10P2-4096``, ``VAR-d17``, ``hf://owner/repo/path``.

Every option that takes a tokenizer or a VAR goes through :func:`resolve_checkpoint`, which accepts

* an existing local file or xqtool checkpoint directory (returned unchanged; a local path wins over a name);
* a registry name from ``xqtool/zoo.yaml`` (the published XQ-GAN zoo), optionally ``NAME@REVISION``;
* ``hf://OWNER/REPO[@REVISION]/PATH`` (also ``hf://OWNER/REPO/PATH@REVISION``): a file in a Hub repository, or, when
  PATH is empty or a folder, an xqtool checkpoint directory (``config.yaml`` + ``model.safetensors``
  [+ ``ema.safetensors``]) fetched with ``snapshot_download``.

Files come through ``huggingface_hub`` (``hf_hub_download``): its cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``),
``HF_HUB_OFFLINE`` and revisions (branch, tag or commit). Offline with the file absent, one line gives the exact
download command of the installed ``huggingface_hub``. A cached file is checked before it is loaded: its size (when the
registry knows it) and the content hash the cache names its blob after (sha256 for LFS files, git-sha1 otherwise), so a
truncated or altered file is refused by name. Loading itself stays with ``weights_only=True`` and the official-layout
checks of :mod:`xqtool.checkpoints` / :mod:`xqtool.checkpoints.var`.

Extra registry entries (own models, tests): a YAML file with a ``models:`` mapping, named by ``$XQTOOL_REGISTRY``
(several separated by ``os.pathsep``) or passed as ``registry=``; its entries override the packaged ones by name.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from xqtool.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]

REGISTRY_ENV = "XQTOOL_REGISTRY"
ZOO_FILE = Path(__file__).with_name("zoo.yaml")
KINDS = ("tokenizer", "var")
#: files of an xqtool checkpoint directory fetched from a Hub repository
XQTOOL_DIR_FILES = ("config.yaml", "model.safetensors", "ema.safetensors")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class ModelNotCachedError(CheckpointError):
    """A Hub file is not in the local cache and cannot be downloaded (offline or no network)."""


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class ModelEntry:
    """One published checkpoint (see the field notes at the top of ``xqtool/zoo.yaml``)."""

    name: str
    kind: str
    repo: str
    file: str
    revision: Optional[str] = None
    config: Optional[str] = None
    tokenizer: Optional[str] = None
    latent: Optional[str] = None
    branches: Optional[int] = None
    tokens_per_image: Optional[int] = None
    codebook: Optional[int] = None
    metric: Optional[Dict[str, float]] = None
    data: str = "unknown"
    licence: str = "unknown"
    size: Optional[int] = None
    aliases: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def reference(self) -> str:
        """``hf://repo/file`` (with ``@revision`` when pinned)."""
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}{rev}/{self.file}"

    def metric_text(self) -> str:
        """``rFID 0.80`` / ``gFID 2.60`` / ``unknown``."""
        if not self.metric:
            return "unknown"
        return ", ".join(f"{k} {v:.2f}" for k, v in self.metric.items())

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "name": self.name, "kind": self.kind, "repo": self.repo, "file": self.file, "revision": self.revision,
            "reference": self.reference, "config": self.config, "tokenizer": self.tokenizer, "latent": self.latent,
            "branches": self.branches, "tokens_per_image": self.tokens_per_image, "codebook": self.codebook,
            "metric": dict(self.metric) if self.metric else None, "data": self.data, "licence": self.licence,
            "size": self.size, "aliases": list(self.aliases),
        }


_ENTRY_FIELDS = {f for f in ModelEntry.__dataclass_fields__ if f != "name"}


def _read_registry_file(path: Path) -> Dict[str, ModelEntry]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read model registry {path}: {str(exc).splitlines()[0]}") from None
    models = data.get("models") if isinstance(data, Mapping) else None
    if not isinstance(models, Mapping):
        raise CheckpointError(f"model registry {path} has no 'models:' mapping")
    out: Dict[str, ModelEntry] = {}
    for name, spec in models.items():
        if not isinstance(spec, Mapping):
            raise CheckpointError(f"model registry {path}: entry '{name}' is not a mapping")
        unknown = sorted(set(spec) - _ENTRY_FIELDS)
        if unknown:
            raise CheckpointError(f"model registry {path}: entry '{name}' has unknown field(s) {', '.join(unknown)}")
        missing = [k for k in ("kind", "repo", "file") if not spec.get(k)]
        if missing:
            raise CheckpointError(f"model registry {path}: entry '{name}' lacks {', '.join(missing)}")
        if spec["kind"] not in KINDS:
            raise CheckpointError(f"model registry {path}: entry '{name}' has kind '{spec['kind']}' (use {'/'.join(KINDS)})")
        kw = dict(spec)
        kw["aliases"] = tuple(str(a) for a in (kw.get("aliases") or ()))
        kw["revision"] = str(kw["revision"]) if kw.get("revision") is not None else None
        out[str(name)] = ModelEntry(name=str(name), **kw)
    return out


@lru_cache(maxsize=8)
def _cached_registry(paths: Tuple[str, ...]) -> Tuple[ModelEntry, ...]:
    merged: Dict[str, ModelEntry] = {}
    for p in paths:
        merged.update(_read_registry_file(Path(p)))
    return tuple(merged.values())


def registry_files(registry: Optional[Union[PathLike, Sequence[PathLike]]] = None) -> List[str]:
    """The registry files in force: the packaged zoo, then ``$XQTOOL_REGISTRY``, then `registry`."""
    files = [str(ZOO_FILE)]
    env = os.environ.get(REGISTRY_ENV, "").strip()
    files += [p for p in env.split(os.pathsep) if p]
    if registry is not None:
        files += [str(registry)] if isinstance(registry, (str, os.PathLike)) else [str(r) for r in registry]
    for f in files[1:]:
        if not Path(f).is_file():
            raise CheckpointError(f"model registry file not found: {f} (from ${REGISTRY_ENV} or registry=)")
    return files


def list_models(registry: Optional[Union[PathLike, Sequence[PathLike]]] = None) -> List[ModelEntry]:
    """All registry entries (packaged zoo + extra files), in file order."""
    return list(_cached_registry(tuple(registry_files(registry))))


def find_model(name: str, registry: Optional[Union[PathLike, Sequence[PathLike]]] = None) -> Optional[ModelEntry]:
    """The entry called `name` or one of its aliases (case-insensitive); None when unknown."""
    key = name.strip().lower()
    for entry in reversed(list_models(registry)):  # later files override
        if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
            return entry
    return None


# ------------------------------------------------------------------------------------------------ references


@dataclass(frozen=True)
class HubRef:
    """A file (or folder, ``path`` ending without a weights suffix / empty) in a Hub repository."""

    repo: str
    path: str = ""
    revision: Optional[str] = None
    entry: Optional[ModelEntry] = None

    @property
    def label(self) -> str:
        """The name the user gave (registry name or ``hf://`` reference) for messages."""
        rev = f"@{self.revision}" if self.revision else ""
        hf = f"hf://{self.repo}{rev}" + (f"/{self.path}" if self.path else "")
        return f"{self.entry.name} ({hf})" if self.entry else hf

    @property
    def is_file(self) -> bool:
        return self.path.lower().endswith(WEIGHT_SUFFIXES)


_HF_PREFIX = re.compile(r"^hf:/+", re.IGNORECASE)


def _parse_hf(text: str) -> HubRef:
    """``hf://OWNER/REPO[@REV][/PATH]`` or ``hf://OWNER/REPO/PATH@REV`` (``hf:/`` too: ``pathlib`` folds ``//``)."""
    body = _HF_PREFIX.sub("", text.strip())
    trailing_rev: Optional[str] = None
    head, _, last = body.rpartition("/")
    if "@" in last and body.count("/") >= 2:  # hf://owner/repo/path@rev
        last, _, trailing_rev = last.partition("@")
        body = f"{head}/{last}"
    try:
        from huggingface_hub.utils import parse_hf_uri  # huggingface_hub >= 2.4
    except ImportError:  # pragma: no cover - older huggingface_hub: the canonical syntax by hand
        m = re.fullmatch(r"([\w.-]+/[\w.-]+)(?:@([^/]+))?(?:/(.*))?", body)
        if not m:
            raise CheckpointError(f"malformed Hub reference '{text}': use hf://OWNER/REPO[@REVISION]/PATH") from None
        repo, rev, path = m.group(1), m.group(2), m.group(3) or ""
    else:
        from huggingface_hub.errors import HfUriError

        try:
            uri = parse_hf_uri("hf://" + body)
        except HfUriError as exc:
            raise CheckpointError(f"malformed Hub reference '{text}': {str(exc).splitlines()[0]}") from None
        if uri.type != "model":
            raise CheckpointError(f"Hub reference '{text}' names a {uri.type}; checkpoints live in model repositories")
        repo, rev, path = uri.id, uri.revision, uri.path_in_repo
    if rev and trailing_rev:
        raise CheckpointError(f"Hub reference '{text}' gives two revisions")
    return HubRef(repo=repo, path=path.strip("/"), revision=rev or trailing_rev)


def parse_reference(ref: PathLike, registry: Optional[Union[PathLike, Sequence[PathLike]]] = None) -> Optional[HubRef]:
    """`ref` as a :class:`HubRef` (registry name or ``hf://``), or None when it is neither (a local path)."""
    text = os.fspath(ref)
    if _HF_PREFIX.match(text):
        return _parse_hf(text)
    name, _, rev = text.partition("@")
    entry = find_model(name, registry) if name and "/" not in name and os.sep not in name else None
    if entry is None:
        return None
    return HubRef(repo=entry.repo, path=entry.file, revision=rev or entry.revision, entry=entry)


# ------------------------------------------------------------------------------------------------ Hub access


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, not at import time, so a changed environment counts)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache in force now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_command(ref: HubRef) -> str:
    """The shell command of the installed huggingface_hub that puts `ref` into the cache."""
    import huggingface_hub

    major_minor = tuple(int(x) for x in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    cli = "hf download" if major_minor >= (0, 34) else "huggingface-cli download"
    if ref.is_file:
        cmd = f"{cli} {ref.repo} {ref.path}"
    else:
        folder = f"{ref.path}/" if ref.path else ""
        cmd = f"{cli} {ref.repo} " + " ".join(f"{folder}{f}" for f in XQTOOL_DIR_FILES)
    if ref.revision:
        cmd += f" --revision {ref.revision}"
    return cmd


_WHY_OFFLINE = "HF_HUB_OFFLINE is set"
_WHY_UNREACHABLE = "the Hub cannot be reached (HF_HUB_OFFLINE=1 skips the network)"


def _not_cached(ref: HubRef, why: str) -> ModelNotCachedError:
    return ModelNotCachedError(
        f"{ref.label} is not in the Hugging Face cache {hub_cache_dir()} and {why}: run `{download_command(ref)}` "
        f"where there is network (same HF_HOME), or download the file yourself and pass its path"
    )


def _hub_errors() -> Tuple[type, ...]:
    from huggingface_hub import errors

    return tuple(getattr(errors, n) for n in ("RepositoryNotFoundError", "RevisionNotFoundError",
                                              "EntryNotFoundError", "RemoteEntryNotFoundError", "GatedRepoError",
                                              "HfHubHTTPError") if hasattr(errors, n))


@contextlib.contextmanager
def _hub_call(ref: HubRef, failing: str) -> Iterator[bool]:
    """Run one ``huggingface_hub`` download (yields whether it must stay offline), its errors as one line:
    ModelNotCachedError (not cached, offline or unreachable), CheckpointError ``"{label}: {failing}: ..."``."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = is_offline()
    try:
        yield offline
    except LocalEntryNotFoundError:
        raise _not_cached(ref, _WHY_OFFLINE if offline else _WHY_UNREACHABLE) from None
    except _hub_errors() as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{ref.label}: {type(exc).__name__}: {first[:200]}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ref.label}: {failing}: {str(exc).splitlines()[0][:200]}") from None


def _download(ref: HubRef, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    with _hub_call(ref, f"cannot fetch {filename}") as offline:
        path = hf_hub_download(ref.repo, filename, revision=ref.revision, cache_dir=hub_cache_dir(),
                               local_files_only=offline, library_name="xqtool")
    return Path(path)


_VERIFIED: Dict[Tuple[str, int, int], bool] = {}


def verify_cached_file(path: PathLike, ref: Optional[HubRef] = None, expected_size: Optional[int] = None) -> None:
    """Refuse a cached Hub file whose size or content hash is wrong (CheckpointError naming the model and file).

    The Hub cache stores each file as ``blobs/<etag>``: the sha256 of the content for LFS files (64 hex digits), the
    git blob sha1 otherwise (40 hex digits). Both are recomputed here (once per file and process).
    """
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    path = Path(path)
    real = Path(os.path.realpath(path))
    label = ref.label if ref else str(path)
    fix = f"delete it and download again: `{download_command(ref)} --force-download`" if ref else "delete it"
    try:
        st = real.stat()
    except OSError:
        raise CheckpointError(f"{label}: cached file {path} is a broken link; {fix}") from None
    if st.st_size == 0:
        raise CheckpointError(f"{label}: cached file {real} is empty; {fix}")
    if expected_size is not None and st.st_size != expected_size:
        raise CheckpointError(f"{label}: cached file {real} has {st.st_size} bytes, the registry says "
                              f"{expected_size}; {fix}")
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    blob = real.name
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob):
        with open(real, "rb") as fh:
            digest = sha_fileobj(fh).hex()
        if digest != blob:
            raise CheckpointError(f"{label}: cached file {real} is corrupted (sha256 {digest[:12]}… ≠ {blob[:12]}…); {fix}")
    elif real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40}", blob):
        if git_hash(real.read_bytes()) != blob:
            raise CheckpointError(f"{label}: cached file {real} is corrupted (git hash ≠ {blob[:12]}…); {fix}")
    _VERIFIED[key] = True


def fetch_file(ref: HubRef) -> Path:
    """Cache path of the file `ref` points at (downloaded unless offline), verified by :func:`verify_cached_file`."""
    path = _download(ref, ref.path)
    verify_cached_file(path, ref, ref.entry.size if ref.entry else None)
    return path


def fetch_checkpoint_dir(ref: HubRef) -> Path:
    """An xqtool checkpoint directory stored at ``ref.path`` ('' = the repository root) → its local snapshot folder.

    Only ``config.yaml``, ``model.safetensors`` and ``ema.safetensors`` are fetched (``snapshot_download`` with
    ``allow_patterns``); each present file is verified like :func:`fetch_file`.
    """
    from huggingface_hub import snapshot_download

    prefix = f"{ref.path}/" if ref.path else ""
    with _hub_call(ref, "cannot fetch the checkpoint") as offline:
        snap = snapshot_download(ref.repo, revision=ref.revision, cache_dir=hub_cache_dir(),
                                 allow_patterns=[prefix + f for f in XQTOOL_DIR_FILES],
                                 local_files_only=offline, library_name="xqtool")
    folder = Path(snap) / ref.path if ref.path else Path(snap)
    missing = [f for f in XQTOOL_DIR_FILES[:2] if not (folder / f).is_file()]
    if missing:
        if offline:
            raise _not_cached(ref, _WHY_OFFLINE)
        raise CheckpointError(f"{ref.label} is not an xqtool checkpoint directory (no {', '.join(missing)}); "
                              "for a single file give its path: hf://OWNER/REPO/PATH/FILE.pt")
    for f in XQTOOL_DIR_FILES:
        if (folder / f).exists() or (folder / f).is_symlink():
            verify_cached_file(folder / f, ref)
    return folder


def is_cached(entry: ModelEntry) -> bool:
    """True when the entry's file is in the local Hub cache (no network, no hashing)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(entry.repo, entry.file, cache_dir=hub_cache_dir(), revision=entry.revision)
    except Exception:  # noqa: BLE001 - malformed cache: not cached
        return False
    return isinstance(hit, str) and os.path.isfile(hit)


# ------------------------------------------------------------------------------------------------ backbone weights

#: value of a weights setting (``loss.semantic_weights=hub`` ...) that means "timm's Hub repository of this backbone"
HUB_KEYWORD = "hub"
#: files looked for, in order, in a timm Hub repository
TIMM_HUB_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm_hub_repo(model_name: str) -> Optional[Tuple[str, Optional[str], Tuple[str, ...]]]:
    """(repo, revision, candidate files) of timm's pretrained config for ``model_name``; None when it has none."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - unknown name / tag
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo, _, rev = hub_id.partition("@")
    first = getattr(cfg, "hf_hub_filename", None)
    files = tuple(dict.fromkeys([f for f in (first, *TIMM_HUB_FILES) if f]))
    return repo, rev or None, files


def resolve_weights_reference(value: Optional[PathLike], *, label: str, model_name: Optional[str] = None) -> Optional[Path]:
    """Local file for a backbone weights setting that is ``hub`` or ``hf://OWNER/REPO/FILE``; None for anything else.

    ``hub`` uses timm's Hub repository of `model_name` (DINOv2, CLIP, ...). Files come through the Hub cache exactly like
    checkpoints (offline rules, integrity check). Raises :class:`~xqtool.errors.WeightsMissingError` when the file is not
    available (the message carries the download command) or `label` has no known Hub location.
    """
    from xqtool.errors import WeightsMissingError

    if value is None:
        return None
    text = os.fspath(value).strip()
    if text.lower() == HUB_KEYWORD:
        loc = _timm_hub_repo(model_name) if model_name else None
        if loc is None:
            raise WeightsMissingError(f"{label} weights have no known Hugging Face Hub location: give "
                                      "hf://OWNER/REPO/FILE or a local file instead of 'hub'")
        repo, rev, files = loc
        first_miss: Optional[ModelNotCachedError] = None
        for name in files:
            ref = HubRef(repo=repo, path=name, revision=rev)
            try:
                return fetch_file(ref)
            except ModelNotCachedError as exc:
                first_miss = first_miss or exc
            except CheckpointError as exc:
                if "corrupted" in str(exc) or "empty" in str(exc):
                    raise
        raise WeightsMissingError(f"{label} weights: {first_miss}" if first_miss else
                                  f"{label} weights: none of {', '.join(files)} in hf://{repo}")
    if not _HF_PREFIX.match(text):
        return None
    ref = _parse_hf(text)
    if not ref.path:
        raise WeightsMissingError(f"{label} weights: '{text}' names a repository, not a file (hf://OWNER/REPO/FILE)")
    try:
        return fetch_file(ref)
    except ModelNotCachedError as exc:
        raise WeightsMissingError(f"{label} weights: {exc}") from None


# ------------------------------------------------------------------------------------------------ entry point


def resolve_checkpoint(ref: PathLike, kind: Optional[str] = None,
                       registry: Optional[Union[PathLike, Sequence[PathLike]]] = None) -> Path:
    """Local path of the checkpoint `ref` names (see the module docstring); `kind` = 'tokenizer' | 'var' | None.

    Raises:
        CheckpointError: unknown name, wrong kind (a VAR name given as tokenizer, ...), malformed ``hf://``,
            Hub errors, corrupted cached file.
        ModelNotCachedError: offline (or no network) and the file is not cached; the message has the download command.
    """
    local = Path(os.fspath(ref)).expanduser()
    if local.exists() and not _HF_PREFIX.match(os.fspath(ref)):
        return local
    hub = parse_reference(ref, registry)
    if hub is None:
        what = {"tokenizer": "tokenizer ", "var": "VAR "}.get(kind or "", "")
        raise CheckpointError(f"{what}checkpoint not found: {os.fspath(ref)} (not a file or directory here, not a "
                              "registry name (`xqtool models` lists them), not hf://OWNER/REPO/PATH)")
    if hub.entry is not None and kind is not None and hub.entry.kind != kind:
        other = {"var": "a VAR generator (pass it as --var)", "tokenizer": "a tokenizer (pass it as --tokenizer)"}
        wanted = {"var": "VAR generator", "tokenizer": "tokenizer"}[kind]
        raise CheckpointError(f"{hub.entry.name} is {other[hub.entry.kind]}, not a {wanted}")
    return fetch_file(hub) if hub.is_file else fetch_checkpoint_dir(hub)


__all__ = ["ModelEntry", "HubRef", "ModelNotCachedError", "list_models", "find_model", "parse_reference",
           "resolve_checkpoint", "fetch_file", "fetch_checkpoint_dir", "verify_cached_file", "download_command",
           "hub_cache_dir", "is_offline", "is_cached", "registry_files", "REGISTRY_ENV",
           "resolve_weights_reference", "HUB_KEYWORD"]
