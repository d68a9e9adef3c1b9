"""Safe writes: atomic files and directories, umask-honouring permissions, output guards and locks.

Promises (tested in ``tests/test_data_safety.py``):

* **Atomic**: a file or directory appears under its final name only when complete (temporary sibling +
  ``os.replace``). A crash or Ctrl-C never leaves a half-written file under the final name.
* **Crash-safe directory replacement** (:func:`atomic_dir` with ``replace=True``): the new directory is
  written as ``.NAME.tmp-HOST-PID-*``, the old one renamed to ``.NAME.old-HOST-PID``, the new one renamed in, then the
  old one removed. At every instant either ``NAME`` is complete or ``.NAME.old-HOST-PID`` is, and
  :func:`recover_dir` (called by every reader and writer) restores it. Temporaries of dead processes are
  removed on the next run.
* **Permissions**: final files are ``0666 & ~umask`` and directories ``0777 & ~umask`` (``mkstemp`` /
  ``mkdtemp`` create 0600 / 0700; they are chmod'ed before the rename).
* **Never destroy**: :func:`check_output` refuses an existing non-empty output unless ``--overwrite`` is
  given *and* the output is recognisably xqtool's own (manifest / marker), refuses outputs inside (or
  containing) a source, and refuses a file where a directory is expected (and vice versa).
* **One writer**: :func:`output_lock` holds an OS lock (``filelock``) on ``.NAME.lock`` beside the output;
  a second writer gets one line. The OS drops the lock when a process dies, so a lock file left by a
  killed process is stale and simply taken over.
* **Disk full**: ``ENOSPC`` becomes one :class:`~xqtool.errors.OutputError` line naming the path; the
  temporary is removed and earlier outputs stay intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from xqtool.errors import OutputError

PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)

#: Marker file written into output folders that have no manifest of their own (decode, sample, demo-images, ...).
OUTPUT_MARKER = ".xqtool-output.json"

# ------------------------------------------------------------------------------------------------ permissions


def current_umask() -> int:
    """The process umask (read from /proc when possible, which does not change it even briefly)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: PathLike, recursive: bool = False) -> None:
    """chmod `path` (and with `recursive` everything under it) to what a plain ``open``/``mkdir`` gives:
    0666 / 0777 & ~umask. Some writers (``mkstemp``, ``mkdtemp``, safetensors) create 0600 / 0700."""
    p = Path(path)
    mask = current_umask()
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    if recursive and p.is_dir():
        for root, dirs, files in os.walk(p):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)


def checksums_enabled() -> bool:
    """Whether readers verify stored checksums (default yes; ``XQTOOL_SKIP_CHECKSUMS=1`` skips the hashing,
    about 1 s per GB, for very large trusted artefacts)."""
    return os.environ.get("XQTOOL_SKIP_CHECKSUMS", "") != "1"


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (streamed; used to detect truncated or bit-flipped artefacts)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ errors


def _is_enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _no_space(path: Path) -> OutputError:
    return OutputError(f"cannot write {path}: no space left on device (earlier outputs are intact; free space and re-run)")


@contextlib.contextmanager
def _translate_os_errors(path: Path, permission: bool = True) -> Iterator[None]:
    """ENOSPC/EDQUOT (and, with `permission`, EACCES) → one OutputError line naming `path`."""
    try:
        yield
    except OSError as exc:
        if _is_enospc(exc):
            raise _no_space(path) from None
        if permission and isinstance(exc, PermissionError):
            raise OutputError(f"cannot write {path}: permission denied") from None
        raise


# ------------------------------------------------------------------------------------------------ atomic files


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success chmod it per the umask and rename it onto `path`.

    The temporary file keeps the final suffix (so libraries that look at extensions work). On error the
    temporary file is removed and `path` is untouched; ENOSPC becomes an OutputError naming `path`.
    """
    path = Path(path)
    with _translate_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner()}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _translate_os_errors(path, permission=False):
            yield tmp_path
            apply_umask(tmp_path)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ atomic dirs

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<owner>[^/]+-\d+)-[a-z0-9_]+(\.[^/]*)?$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<owner>[^/]+-\d+)$")


def _owner() -> str:
    """``HOST-PID`` of this process: names temporaries so that only their own machine judges them stale."""
    import socket

    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def aside_path(path: PathLike) -> Path:
    """``.NAME.old-HOST-PID``: where a replaced output waits until its successor is in place."""
    p = Path(path)
    return p.parent / f".{p.name}.old-{_owner()}"


def _owner_dead(owner: str) -> bool:
    """True when `owner` (HOST-PID) is a process of this machine that no longer runs."""
    host, _, pid = owner.rpartition("-")
    if host != _owner().rpartition("-")[0] or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _siblings(path: Path, pattern: re.Pattern) -> list:
    if not path.parent.is_dir():
        return []
    out = []
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and m.group("name") == path.name:
            out.append((m.group("owner"), p))
    return out


def recover_dir(path: PathLike) -> Path:
    """Finish an interrupted :func:`atomic_dir` replacement of `path`.

    If `path` is missing but ``.NAME.old-HOST-PID`` of a dead process exists, the old complete directory is renamed
    back (the replacement never finished). Leftover ``.old-HOST-PID`` copies (when `path` exists) and ``.tmp-HOST-PID-*``
    temporaries of dead processes are removed. Returns `path`.
    """
    path = Path(path)
    olds = [(owner, p) for owner, p in _siblings(path, _OLD_RE) if _owner_dead(owner)]
    for _, p in sorted(olds, key=lambda x: x[1].stat().st_mtime, reverse=True):
        if not path.exists():
            log.warning("restoring %s from %s (an earlier write was interrupted)", path, p.name)
            os.replace(p, path)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for owner, p in _siblings(path, _TMP_RE):
        if not _owner_dead(owner):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it becomes `path` (0777 & ~umask).

    An existing `path` is replaced only with ``replace=True`` (callers check ownership first, see
    :func:`check_output`): it is moved aside to ``.NAME.old-HOST-PID`` and deleted only after the new one is in
    place, so at every instant a complete directory exists under `path` or ``.NAME.old-HOST-PID``
    (:func:`recover_dir`). Without ``replace`` an existing `path` raises OutputError and nothing is touched.
    ENOSPC while writing raises OutputError naming `path`; the temporary is removed.
    """
    path = Path(path)
    with _translate_os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_owner()}-", dir=path.parent))
    try:
        with _translate_os_errors(path, permission=False):
            yield tmp
            apply_umask(tmp, recursive=True)
            old = None
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()  # an empty folder holds nothing to lose
            if path.exists() or path.is_symlink():
                if not replace:
                    raise OutputError(f"{path} appeared while this command was writing it: refusing to replace it")
                if not path.is_dir() or path.is_symlink():
                    raise OutputError(f"{path} exists and is not a folder: refusing to replace it")
                old = aside_path(path)
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ output guards


@contextlib.contextmanager
def fresh_output_dir(path: PathLike, kind: str, *, replace: bool = False, enabled: bool = True) -> Iterator[Path]:
    """Create output folder `path` (with the marker of `kind`) for files written one by one during the run.

    With ``replace`` (an earlier xqtool output of this kind, see :func:`check_output`) the old folder is moved
    to ``.NAME.old-HOST-PID`` first and removed only when the run succeeds; on failure the partial new folder is
    removed and the old one restored. ``enabled=False`` (non-main processes) yields `path` untouched.
    """
    path = Path(path)
    if not enabled:
        yield path
        return
    old = None
    with _translate_os_errors(path):
        if replace and path.exists():
            old = aside_path(path)
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, kind)
    try:
        yield path
    except BaseException:
        if old is not None:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def write_marker(directory: PathLike, kind: str, **extra: object) -> None:
    """Mark `directory` as an xqtool output of `kind` (``.xqtool-output.json``)."""
    from xqtool import __version__

    atomic_write_text(Path(directory) / OUTPUT_MARKER,
                      json.dumps({"kind": kind, "xqtool_version": __version__, **extra}) + "\n")


def has_marker(directory: PathLike, kind: Optional[str] = None) -> bool:
    """True when `directory` carries an xqtool output marker (of `kind`, when given)."""
    p = Path(directory) / OUTPUT_MARKER
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (kind is None or data.get("kind") == kind)


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def _source_dirs(sources: Iterable[object]) -> list:
    out = []
    for s in sources:
        if s is None:
            continue
        text = str(s)
        if "://" in text or text.startswith("pipe:"):
            continue
        if "{" in text:  # brace pattern of shards: its folder
            p = Path(re.sub(r"\{.*$", "", text)).parent
        else:
            p = Path(text)
        if p.exists():
            out.append(p.resolve())
    return out


def check_not_in_source(output: PathLike, sources: Sequence[object]) -> None:
    """OutputError when `output` is a source, lies inside a source folder, or contains a source."""
    out = Path(output).resolve()
    for src in _source_dirs(sources):
        if out == src or src in out.parents:
            raise OutputError(f"output {output} lies inside the source {src}: choose an output outside the source")
        if out in src.parents:
            raise OutputError(f"output {output} contains the source {src}: replacing it would delete the source; "
                              "choose another output")


def check_output(
    path: PathLike,
    *,
    kind: str,
    is_dir: bool,
    overwrite: bool = False,
    ours: Optional[Callable[[Path], bool]] = None,
    sources: Sequence[object] = (),
) -> bool:
    """Decide whether this run may write `path`; OutputError (one line) when it may not.

    Returns True when an earlier xqtool output is there and will be replaced (``overwrite``), False when
    `path` is free (missing or an empty folder). `ours(path)` recognises xqtool's own output of this kind
    (default: the :data:`OUTPUT_MARKER` of `kind`).
    """
    p = Path(path)
    check_not_in_source(p, sources)
    recover_dir(p)
    if not (p.exists() or p.is_symlink()):
        return False
    if is_dir and not p.is_dir():
        raise OutputError(f"{p} exists and is a file, but {kind} writes a folder there: choose another output")
    if not is_dir and p.is_dir():
        raise OutputError(f"{p} is a folder, but {kind} writes a file there: choose another output")
    if is_dir and _is_empty_dir(p):
        return False
    recognise = ours or (lambda q: has_marker(q, kind))
    if not recognise(p):  # said first: --overwrite would not help
        raise OutputError(f"{p} exists and is not an xqtool {kind} output: choose another output (--overwrite only "
                          "replaces xqtool's own outputs)")
    if not overwrite:
        raise OutputError(f"{p} already exists{' and is not empty' if is_dir else ''}: pass --overwrite to replace "
                          f"it, or choose another output")
    return True


# ------------------------------------------------------------------------------------------------ locks


def lock_path(path: PathLike) -> Path:
    """``PARENT/.NAME.lock``: the lock file of output `path` (beside it, so it survives directory swaps)."""
    p = Path(path)
    return p.parent / f".{p.name}.lock"


def acquire_output_lock(path: PathLike) -> "object":
    """Take the exclusive OS lock of output `path` now and return it (call ``.release()``); OutputError when held.

    The lock is ``filelock.FileLock`` (``flock``) on ``.NAME.lock`` beside `path`: the OS releases it when its
    process dies, so a lock file left behind by a killed process never blocks (it is stale and taken over).
    """
    from filelock import FileLock, Timeout

    lp = lock_path(path)
    with _translate_os_errors(lp):
        lp.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lp), mode=0o666 & ~current_umask())
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputError(
            f"another xqtool process is writing {path} (it holds {lp}); wait for it to finish or choose another "
            "output (a lock of a killed process is released by the OS and never blocks)"
        ) from None
    return _HeldLock(lock, lp)


class _HeldLock:
    """A held output lock; :meth:`release` removes the lock file (while still holding it) and unlocks."""

    def __init__(self, lock: object, path: Path) -> None:
        self._lock, self._path = lock, path

    def release(self) -> None:
        if self._lock is None:
            return
        try:  # unlink only our own inode, while we still hold it, so no later holder loses its file
            fd = getattr(getattr(self._lock, "_context", None), "lock_file_fd", None)
            if fd is not None and os.path.samestat(os.fstat(fd), os.lstat(self._path)):
                os.unlink(self._path)
        except OSError:
            pass
        self._lock.release()  # type: ignore[attr-defined]
        self._lock = None


@contextlib.contextmanager
def output_lock(path: PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold :func:`acquire_output_lock` of `path` for the duration of the block (no-op when not `enabled`)."""
    if not enabled:
        yield
        return
    lock = acquire_output_lock(path)
    try:
        yield
    finally:
        lock.release()  # type: ignore[attr-defined]


RUN_MARKERS = ("checkpoints", "last", "best", "var-last", OUTPUT_MARKER)


def is_run_dir(path: PathLike) -> bool:
    """An xqtool training run: its marker, training states, or exported models."""
    p = Path(path)
    return any((p / m).exists() for m in RUN_MARKERS)


def check_run_dir(path: PathLike, *, resume: bool, overwrite: bool = False, has_states: bool = False) -> None:
    """Refuse a training output that would destroy or mix data; OutputError / ConfigError in one line.

    * a file at `path`, or a non-empty folder that is not an xqtool run: always refused;
    * an xqtool run holding training states without ``resume``: refused (pass --resume auto), unless
      ``overwrite``, which deletes the earlier run first (it is xqtool's own output);
    * ``resume`` into an existing run: fine.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} exists and is a file, but training writes a run folder there: choose another output")
    if not p.is_dir() or not any(p.iterdir()):
        return
    if not is_run_dir(p):
        raise OutputError(f"{p} is not empty and is not an xqtool run folder: choose another output folder "
                          "(xqtool never writes into folders it did not create)")
    if resume:
        return
    if overwrite:
        log.warning("--overwrite: deleting the earlier run in %s", p)
        for child in p.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return
    if has_states:
        from xqtool.errors import ConfigError

        raise ConfigError(f"{p} already holds training checkpoints: pass --resume auto to continue, --overwrite to "
                          "start over, or choose another -o/--output")
