"""Content-addressed artifact store on disk.

A blob lives at ``ROOT/sha256/ab/abcdef...`` named by the sha256 of its bytes. Writes go
to a temporary file in ``ROOT/tmp`` (same file system), are fsynced, and renamed into
place, so a crash never leaves a half artifact under its final name; a blob that is
already present is not written again. Readers only ever see complete blobs.

A writer holds an exclusive flock on its temp file while it writes; `sweep_tmp` (at server
start) removes only temp files nobody holds and nobody has touched for a while, i.e. those
of a killed process, never those of another live server sharing the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO
from offsite.files import fsync_dir

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 20
TMP_IDLE_S = 300.0  # a temp file untouched this long and unlocked belongs to a dead writer


def _locked_temp(directory: Path, prefix: str) -> tuple[int, str]:
    """mkstemp, flocked until its descriptor is closed (so `sweep_tmp` leaves it alone)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, tmp


class ArtifactNotFound(LookupError):
    pass


class InvalidDigest(ValueError):
    pass


class ArtifactCorrupt(RuntimeError):
    """A stored blob no longer hashes to its name (bit rot, a disk fault, tampering)."""


def check_sha256(sha: str) -> str:
    """Return `sha` if it is 64 lowercase hex characters (it becomes a path component)."""
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise InvalidDigest(f"{sha!r} is not a sha256 digest (64 lowercase hex characters)")
    return sha


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._verified: set[tuple] = set()  # (sha, inode, size, mtime) hashed once per process

    def path(self, sha: str) -> Path:
        check_sha256(sha)
        return self.blobs / sha[:2] / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        p = self.path(sha)
        if not p.is_file():
            raise ArtifactNotFound(f"artifact {sha} is not in the store")
        return p.stat().st_size

    def open(self, sha: str) -> BinaryIO:
        p = self.path(sha)
        if not p.is_file():
            raise ArtifactNotFound(f"artifact {sha} is not in the store")
        return open(p, "rb")

    def open_verified(self, sha: str) -> BinaryIO:
        """Open a blob for serving, re-hashing it first (once per process while the file's
        inode, size and mtime stay the same): flipped bytes are refused, never served."""
        p = self.path(sha)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {sha} is not in the store") from None
        key = (sha, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._verified:
            if not self.verify(sha):
                raise ArtifactCorrupt(
                    f"artifact {sha} is corrupted on the server's disk (its bytes no longer match "
                    "its sha256), so it is not served; the model owner must restore it from a "
                    "backup or upload it again"
                )
            self._verified.add(key)
        return open(p, "rb")

    def put_stream(self, chunks: Iterable[bytes], expected_sha256: str | None = None) -> tuple[str, int]:
        """Store the concatenated chunks; returns (sha256, size)."""
        fd, tmp = _locked_temp(self.tmp, "put-")
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise InvalidDigest(
                    f"content has sha256 {sha}, expected {expected_sha256}; the bytes were altered "
                    "or truncated in transit, send them again"
                )
            self._commit(tmp, sha)
            return sha, size
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_file(self, path: str | Path) -> str:
        with open(path, "rb") as fh:
            sha, _ = self.put_stream(iter(lambda: fh.read(_COPY_CHUNK), b""))
        return sha

    def put_bytes(self, data: bytes) -> str:
        sha, _ = self.put_stream([data])
        return sha

    def put_dir_as_tar(self, directory: str | Path) -> str:
        """Store a directory as a reproducible tar (sorted names, zero times and owners).

        The same directory contents always give the same digest, so a rebuilt bundle that
        did not change is not a new artifact.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory")
        fd, tmp = _locked_temp(self.tmp, "tar-")
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(directory.rglob("*")):
                    rel = path.relative_to(directory).as_posix()
                    info = tar.gettarinfo(str(path), arcname=rel)
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o755 if path.is_dir() else 0o644
                    if path.is_symlink():
                        raise ValueError(f"{path}: symbolic links are not stored in artifacts")
                    if path.is_file():
                        with open(path, "rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
            return self.put_file(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def sweep_tmp(self, idle_s: float = TMP_IDLE_S) -> int:
        """Remove temp files left by killed writers (unlocked, idle for `idle_s`); returns how many."""
        removed, now = 0, time.time()
        for p in self.tmp.iterdir():
            try:
                if not p.is_file() or p.is_symlink() or now - p.stat().st_mtime < idle_s:
                    continue
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live writer holds it
                p.unlink(missing_ok=True)
                removed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return removed

    def _commit(self, tmp: str, sha: str) -> None:
        final = self.path(sha)
        if final.is_file():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def read_range(self, sha: str, offset: int, length: int) -> bytes:
        with self.open(sha) as fh:
            fh.seek(offset)
            return fh.read(length)

    def verify(self, sha: str) -> bool:
        """Re-hash a stored blob (detects bit rot or tampering on disk)."""
        digest = hashlib.sha256()
        with self.open(sha) as fh:
            for chunk in iter(lambda: fh.read(_COPY_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha


class BlobWriter:
    """Incremental writes (e.g. an upload stream) with the same temp + fsync + rename commit."""

    def __init__(self, store: ArtifactStore, max_bytes: int | None = None) -> None:
        self._store = store
        self._max = max_bytes
        fd, self._tmp = _locked_temp(store.tmp, "upload-")
        self._fh = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._max is not None and self.size > self._max:
            self.abort()
            raise ValueError(f"upload exceeds the server's limit of {self._max} bytes")
        self._digest.update(data)
        self._fh.write(data)

    def commit(self, expected_sha256: str | None = None) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        sha = self._digest.hexdigest()
        try:
            if expected_sha256 and sha != expected_sha256:
                raise InvalidDigest(f"uploaded bytes have sha256 {sha}, expected {expected_sha256}; upload again")
            self._store._commit(self._tmp, sha)
        finally:
            Path(self._tmp).unlink(missing_ok=True)
        return sha

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        Path(self._tmp).unlink(missing_ok=True)
