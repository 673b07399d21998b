"""Crash-safe file writing, reading and hashing shared by every part of Offsite.

A file is written to a temporary name in the same directory, fsynced, then renamed over
its final name, so a reader (or a restart after a crash) sees the old file or the new
one, never half of one. Secrets get their mode before the first byte is written. A
directory is built the same way (`atomic_dir`) and swapped in whole; a tar is unpacked
only into such a directory, regular files only, within a size bound (`extract_tar`).
JSON Lines are read with errors naming FILE:LINE (`read_jsonl`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk (ENOSPC/EDQUOT).

    Libraries with their own I/O (safetensors' Rust writer) raise their own types whose
    message carries the OS error, so the text is checked as well as errno."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc) for t in _DISK_FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def atomic_write(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically with permission bits `mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, mode: int = 0o644) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str), mode)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- directories -------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    kernel, libc or file system cannot, so the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (and `root` itself)."""
    root = Path(root)
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden sibling of `path` (yielded), then put it at `path`.

    On success everything in it is fsynced and it takes `path`'s place: a missing `path`
    by a rename; an existing one (only with `overwrite`, else FileExistsError before any
    work) by an atomic exchange, so there is no moment with no directory at `path` (two
    renames where the file system cannot exchange). The old directory is removed after.
    On failure the sibling is removed and `path` is as it was."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, f"{path} already exists", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        yield staging
        fsync_tree(staging)
        _put_in_place(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _put_in_place(staging: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        try:
            os.rename(staging, path)  # refuses a non-empty directory that appeared meanwhile
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not overwrite:
                raise FileExistsError(errno.EEXIST, f"{path} appeared while it was being built", str(path)) from None
        else:
            fsync_dir(path.parent)
            return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a directory", str(path))
    if _exchange(staging, path):
        fsync_dir(path.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old directory
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(old, path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# --- tar archives ----------------------------------------------------------------------------


class UnsafeArchive(ValueError):
    """A tar member that would land outside the destination, a link or device, or an
    archive larger than allowed."""


def extract_tar(archive: str | Path, dest: str | Path, max_bytes: int, overwrite: bool = False) -> Path:
    """Unpack `archive` into the new directory `dest` (built with `atomic_dir`): regular
    files and directories only, nothing outside `dest`, at most `max_bytes` in all (checked
    from the headers before a byte is written). Raises UnsafeArchive naming the member."""
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            total = 0
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts:
                    raise UnsafeArchive(
                        f"{archive.name}: member {m.name!r} points outside the archive's folder; refusing it"
                    )
                if not (m.isfile() or m.isdir()):
                    raise UnsafeArchive(f"{archive.name}: member {m.name!r} is a link or special file; refusing it")
                total += m.size
            if total > max_bytes:
                raise UnsafeArchive(f"{archive.name}: {total} bytes unpacked, more than the {max_bytes} allowed")
            with atomic_dir(dest, overwrite=overwrite) as staging:
                tf.extractall(staging, members=members, filter="data")
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeArchive(f"{archive.name}: not a readable tar archive ({e}); it is truncated or corrupt") from None
    return Path(dest)


# --- JSON Lines ------------------------------------------------------------------------------


class JsonlError(ValueError):
    """A JSON Lines file that cannot be read; the message starts with FILE:LINE."""


MAX_JSONL_LINE_BYTES = 16 << 20  # one example or record; a longer line is refused before it is read whole


def read_jsonl(
    source: str | Path | IO, name: str | None = None, max_line_bytes: int = MAX_JSONL_LINE_BYTES
) -> Iterator[tuple[str, Any]]:
    """("FILE:LINE", value) for every non-blank line of a JSON Lines file (a path or an open
    file, text or binary). Bad UTF-8 or bad JSON raises JsonlError naming FILE:LINE, and so
    does a line over `max_line_bytes` (memory stays bounded whatever the file holds)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            yield from read_jsonl(fh, name or str(source), max_line_bytes)
        return
    name = name or getattr(source, "name", "<input>")
    lineno = 0
    while raw := source.readline(max_line_bytes + 1):
        lineno += 1
        where = f"{name}:{lineno}"
        if len(raw) > max_line_bytes:
            raise JsonlError(
                f"{where}: a line longer than {max_line_bytes >> 20} MiB; put one example per line and "
                "split very long texts into several"
            )
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise JsonlError(f"{where}: not UTF-8; convert the file, e.g. `iconv -t utf-8`") from None
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise JsonlError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        yield where, value
