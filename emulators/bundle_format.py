"""The bundle's on-disk format and its verification, for directories and tars of one.

A bundle is a flat directory (or a tar of one, compressed or not):

    manifest.json         format, base model id + digest, architecture, the split,
                          quantization per block, sha256 + size of every other file
    manifest.sig          Ed25519 signature over the exact bytes of manifest.json (base64)
    emulator.safetensors  the frozen part (embeddings, final norm, LM head, middle blocks)
    adapter.safetensors   the initial adapter (first/last blocks), keyed by ORIGINAL names
    config.json           the emulator model's config
    tokenizer files       whatever the tokenizer's save_pretrained writes

Verification fails closed: a missing, extra, truncated or changed file, a missing or bad
signature, or the wrong key each raise `BundleError` naming the file.

A tar is never unpacked before its manifest is trusted: the first pass reads only
manifest.json and manifest.sig (size-capped) and checks the signature; the second pass
takes only the files the manifest lists, each exactly as large as the manifest says,
hashing the bytes as they stream. So a small archive that would expand to gigabytes is
refused before a byte of it is written, and nothing goes to the system temp dir:
`verify_bundle` writes nothing at all, `extract_bundle` writes beside its destination.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import lzma
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from offsite.files import atomic_dir, sha256_file

from .keyring import load_keyring, manifest_key_id
from .signing import SigningKeyError, verify_signature

BUNDLE_FORMAT = "offsite-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
EMULATOR_WEIGHTS = "emulator.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"
CONFIG = "config.json"
SCALE_SUFFIX = "@row_scale"  # companion tensor of a row-wise int8 stored tensor (encoded tensors use NAME@PART keys)

# Caps on what is read from an archive before its signature is checked (a real manifest
# of a 70B model is ~100 KB; a signature is 88 bytes of base64).
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 4 << 10
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle is missing, malformed, unsigned, signed by another key, or changed."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the manifest ------------------------------------------------------------------------


def parse_manifest(manifest_bytes: bytes) -> dict:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{MANIFEST}: format {found!r}, this version reads {BUNDLE_FORMAT!r}")
    return manifest


def check_signature(manifest_bytes: bytes, sig_bytes: bytes | None, public_key_path: str | Path | None) -> None:
    """Raise BundleError unless `sig_bytes` is a trusted key's signature over exactly `manifest_bytes`.

    `public_key_path` is one signing.pub, or a directory of them (a key directory with its
    keyring/, see `keyring.py`): the key id the manifest names picks the key; a manifest
    that names none (older bundles) is tried against each."""
    if public_key_path is None:
        raise BundleError("no public key given: a bundle is verified with the model owner's signing.pub before use")
    try:
        ring = load_keyring(public_key_path)
    except SigningKeyError as e:
        raise BundleError(str(e)) from None
    if sig_bytes is None:
        raise BundleError(f"{SIGNATURE}: missing; the bundle is unsigned and cannot be trusted")
    try:
        signature = base64.b64decode(sig_bytes.strip(), validate=True)
    except ValueError:
        signature = b""
    if len(signature) != 64:
        raise BundleError(
            f"{SIGNATURE}: not an Ed25519 signature (expected 64 bytes, base64); the bundle cannot be trusted"
        )
    try:
        wanted = manifest_key_id(json.loads(manifest_bytes))
    except ValueError:
        wanted = None
    if wanted is not None and wanted not in ring:
        # Fail closed on a key we do not hold, and say which key the bundle wants.
        raise BundleError(
            f"{SIGNATURE}: the manifest was signed by key id {wanted}, which {public_key_path} does not hold "
            f"(key id{'s' if len(ring) > 1 else ''} {', '.join(sorted(ring))}): wrong public key? Ask the model "
            f"owner for the signing.pub of key {wanted} (`offsite-admin keys list`)"
        )
    candidates = [ring[wanted][0]] if wanted is not None else [key for key, _ in ring.values()]
    if not any(verify_signature(key, signature, manifest_bytes) for key in candidates):
        raise BundleError(
            f"{SIGNATURE}: the signature does not match {MANIFEST} under {public_key_path}: "
            "the manifest was changed or signed with another key"
        )


def listed_files(manifest: dict) -> dict[str, dict]:
    """The manifest's file table, each name a plain file name and each entry {sha256, size}."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{MANIFEST}: lists no files")
    for name, entry in files.items():
        p = PurePosixPath(name)
        if p.is_absolute() or len(p.parts) != 1 or name in (MANIFEST, SIGNATURE, "", ".", ".."):
            raise BundleError(f"{MANIFEST}: lists an invalid file name {name!r}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
        ):
            raise BundleError(f"{MANIFEST}: the entry for {name!r} needs an integer size and a sha256")
    return files


def _size_mismatch(name: str, size: int, expected: int) -> BundleError:
    what = "truncated" if size < expected else "grown"
    return BundleError(f"{name}: {size} bytes, the manifest says {expected}: the file was {what} or changed")


def adapter_param_names(model, plan, family) -> list[str]:
    """Emulator names of every parameter inside an adapter block: what adapter.safetensors
    holds (under original names); everything else of the model is emulator.safetensors."""
    positions = set(plan.adapter_positions)
    return [n for n, _ in model.named_parameters() if family.block_index(n) in positions]


def check_bytes(name: str, data: bytes, expected: dict) -> None:
    if len(data) != expected["size"]:
        raise _size_mismatch(name, len(data), expected["size"])
    if sha256_bytes(data) != expected["sha256"]:
        raise BundleError(f"{name}: sha256 differs from the manifest: the file was changed")


# --- a bundle directory ----------------------------------------------------------------------


def _read_dir_manifest(root: Path, public_key_path, check_sig: bool) -> tuple[dict, bytes]:
    manifest_path, sig_path = root / MANIFEST, root / SIGNATURE
    if check_sig and public_key_path is None:
        check_signature(b"", None, None)  # the "no public key" error, before touching files
    if not manifest_path.is_file():
        raise BundleError(f"{MANIFEST}: missing in {root}; not an Offsite bundle")
    manifest_bytes = manifest_path.read_bytes()
    if check_sig:
        check_signature(manifest_bytes, sig_path.read_bytes() if sig_path.is_file() else None, public_key_path)
    return parse_manifest(manifest_bytes), manifest_bytes


def check_listing(root: Path, manifest: dict) -> dict[str, dict]:
    """The manifest's files, after checking the directory holds exactly those (plus the
    manifest and signature), with no links, special files or subdirectories."""
    files = listed_files(manifest)
    present = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"{rel}: a link or special file in the bundle; refusing it")
        if path.is_dir():
            raise BundleError(f"{rel}: an extra directory that the manifest does not list")
        present.add(rel)
    extra = sorted(present - set(files) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleError(f"{extra[0]}: an extra file that the manifest does not list; the bundle was changed")
    missing = sorted(set(files) - present)
    if missing:
        raise BundleError(f"{missing[0]}: missing from the bundle (the manifest lists it)")
    return files


def _check_file(root: Path, name: str, expected: dict) -> None:
    path = root / name
    size = path.stat().st_size
    if size != expected["size"]:
        raise _size_mismatch(name, size, expected["size"])
    if sha256_file(path) != expected["sha256"]:
        raise BundleError(f"{name}: sha256 differs from the manifest: the file was changed")


# --- a tar of a bundle (read as a stream, never unpacked blindly) ------------------------------

# What a truncated or corrupt archive raises, depending on where it breaks and how it is compressed.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        tf = tarfile.open(path, "r:*")
    except _ARCHIVE_ERRORS as e:
        raise BundleError(f"{path.name}: not a readable tar archive ({e}); fetch or copy the bundle again") from None
    try:
        yield tf
    except _ARCHIVE_ERRORS as e:
        raise BundleError(
            f"{path.name}: the archive is truncated or corrupt ({e}); fetch or copy the bundle again"
        ) from None
    finally:
        tf.close()


def _member_end(m: tarfile.TarInfo) -> int:
    return m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _check_not_cut(path: Path, tf: tarfile.TarFile, end: int) -> None:
    """tarfile takes an uncompressed archive cut between or inside members for one that
    ends there; a complete one has two zero blocks after its last member. (A cut
    compressed stream raises EOFError by itself.)"""
    size = path.stat().st_size
    if isinstance(tf.fileobj, io.BufferedReader) and end + 2 * tarfile.BLOCKSIZE > size:
        raise BundleError(
            f"{path.name}: the archive is truncated ({size} bytes, its members and end marker need "
            f"{end + 2 * tarfile.BLOCKSIZE}); fetch or copy the bundle again"
        )


def _member_parts(path: Path, m: tarfile.TarInfo) -> tuple[str, ...]:
    p = PurePosixPath(m.name)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"{path.name}: member {m.name!r} points outside the bundle; refusing to extract")
    if not (m.isfile() or m.isdir()):
        raise BundleError(
            f"{path.name}: member {m.name!r} is a link or special file; a bundle holds regular files only"
        )
    return p.parts


def _read_capped(tf: tarfile.TarFile, m: tarfile.TarInfo, cap: int, what: str) -> bytes:
    if m.size > cap:
        raise BundleError(f"{what}: {m.size} bytes in the archive, more than the {cap} a bundle's {what} can have")
    fh = tf.extractfile(m)
    data = fh.read(cap + 1) if fh is not None else b""
    if len(data) != m.size:
        raise BundleError(f"{what}: {len(data)} of {m.size} bytes; the archive is truncated")
    return data


def _read_tar_head(
    path: Path, public_key_path, check_sig: bool, want_sig: bool = True
) -> tuple[dict, bytes, bytes | None, tuple[str, ...]]:
    """Pass 1: (manifest, its bytes, the signature's bytes, the folder they sit in) with
    only those two members read. Members are walked header by header; nothing is written.
    Without `want_sig` (and `check_sig`) it stops at the manifest."""
    manifest_bytes = sig_bytes = None
    prefix: tuple[str, ...] | None = None
    sigs: dict[tuple[str, ...], bytes] = {}
    want_sig = want_sig or check_sig
    end = 0
    with _open_tar(path) as tf:
        for m in tf:
            end = max(end, _member_end(m))
            parts = _member_parts(path, m)
            if not m.isfile() or not parts or len(parts) > 2:
                continue
            if parts[-1] == MANIFEST and manifest_bytes is None:
                manifest_bytes, prefix = _read_capped(tf, m, MAX_MANIFEST_BYTES, MANIFEST), parts[:-1]
            elif parts[-1] == SIGNATURE and want_sig:
                sigs.setdefault(parts[:-1], _read_capped(tf, m, MAX_SIGNATURE_BYTES, SIGNATURE))
            if manifest_bytes is not None:
                sig_bytes = sigs.get(prefix)
                if sig_bytes is not None or not want_sig:
                    break
        else:
            _check_not_cut(path, tf, end)
    if manifest_bytes is None:
        raise BundleError(
            f"{path.name}: {MANIFEST} missing (neither at the top of the archive nor in its single "
            "folder); not an Offsite bundle"
        )
    if check_sig:
        check_signature(manifest_bytes, sig_bytes, public_key_path)
    return parse_manifest(manifest_bytes), manifest_bytes, sig_bytes, prefix or ()


OpenOut = Callable[[str], IO[bytes] | None]


def _stream_tar_files(path: Path, prefix: tuple[str, ...], files: dict[str, dict], open_out: OpenOut) -> None:
    """Pass 2: every listed file, hashed as it streams into `open_out(name)` (None: hash
    only). A member whose header size differs from the manifest is refused before it is
    read, so no more than the manifest's sizes is ever decompressed into a sink."""
    seen: set[str] = set()
    end = 0
    with _open_tar(path) as tf:
        for m in tf:
            end = max(end, _member_end(m))
            parts = _member_parts(path, m)
            if m.isdir():
                if parts and parts != prefix:
                    raise BundleError(f"{m.name}: an extra directory that the manifest does not list")
                continue
            if parts[:-1] != prefix:
                raise BundleError(f"{m.name}: an extra file outside the bundle's folder; the bundle was changed")
            name = parts[-1]
            if name in seen:
                raise BundleError(f"{name}: twice in the archive; the bundle was changed")
            seen.add(name)
            if name in (MANIFEST, SIGNATURE):
                continue  # read and checked in pass 1
            if name not in files:
                raise BundleError(f"{name}: an extra file that the manifest does not list; the bundle was changed")
            expected = files[name]
            if m.size != expected["size"]:
                raise _size_mismatch(name, m.size, expected["size"])
            _copy_member(tf, m, name, expected, open_out)
        _check_not_cut(path, tf, end)
    missing = sorted(set(files) - seen)
    if missing:
        raise BundleError(f"{missing[0]}: missing from the bundle (the manifest lists it)")


def _copy_member(tf: tarfile.TarFile, m: tarfile.TarInfo, name: str, expected: dict, open_out: OpenOut) -> None:
    src = tf.extractfile(m)
    h, n = hashlib.sha256(), 0
    try:
        out = open_out(name)
    except OSError as e:
        raise BundleError(f"{name}: cannot create it while extracting ({e.strerror})") from None
    try:
        while n < m.size:
            chunk = src.read(min(_CHUNK, m.size - n)) if src is not None else b""
            if not chunk:
                raise _size_mismatch(name, n, expected["size"])
            n += len(chunk)
            h.update(chunk)
            if out is not None:
                try:
                    out.write(chunk)
                except OSError as e:
                    raise BundleError(f"{name}: cannot write it while extracting ({e.strerror})") from None
    finally:
        if out is not None:
            try:
                out.close()
            except OSError as e:
                raise BundleError(f"{name}: cannot write it while extracting ({e.strerror})") from None
    if h.hexdigest() != expected["sha256"]:
        raise BundleError(f"{name}: sha256 differs from the manifest: the file was changed")


def _is_archive(path: Path) -> bool:
    if path.is_dir():
        return False
    if not path.exists():
        raise BundleError(f"{path}: no such bundle; pass a bundle directory or a .tar of one")
    return True


# --- the verbs ---------------------------------------------------------------------------


def verify_bundle(path: str | Path, public_key_path: str | Path) -> dict:
    """Check signature, listing, sizes and hashes; return the manifest or raise BundleError.
    A tar is checked as a stream: nothing is written anywhere."""
    path = Path(path)
    if _is_archive(path):
        manifest, _, _, prefix = _read_tar_head(path, public_key_path, True)
        _stream_tar_files(path, prefix, listed_files(manifest), lambda name: None)
        return manifest
    manifest, _ = _read_dir_manifest(path, public_key_path, True)
    files = check_listing(path, manifest)
    for name, expected in sorted(files.items()):
        _check_file(path, name, expected)
    return manifest


def read_manifest_unverified(path: str | Path) -> dict:
    """The manifest without checking anything (for `inspect` without a key)."""
    path = Path(path)
    if _is_archive(path):
        return _read_tar_head(path, None, False, want_sig=False)[0]
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{MANIFEST}: missing in {path}; not an Offsite bundle")
    return json.loads((path / MANIFEST).read_bytes())


def read_bundle_files(
    path: str | Path, public_key_path, check_sig: bool = True
) -> tuple[dict, bytes, dict[str, bytes]]:
    """(manifest, manifest bytes, {file: verified bytes}) — what a loader deserialises is
    exactly what was hashed, so a file swapped after a check is caught too."""
    path = Path(path)
    blobs: dict[str, bytes] = {}
    if _is_archive(path):
        manifest, manifest_bytes, _, prefix = _read_tar_head(path, public_key_path, check_sig)
        sinks: dict[str, io.BytesIO] = {}

        def keep(name: str) -> IO[bytes]:
            sinks[name] = _KeptBytes()
            return sinks[name]

        _stream_tar_files(path, prefix, listed_files(manifest), keep)
        blobs = {name: sink.getvalue() for name, sink in sorted(sinks.items())}
    else:
        manifest, manifest_bytes = _read_dir_manifest(path, public_key_path, check_sig)
        files = check_listing(path, manifest)
        for name, expected in sorted(files.items()):
            data = (path / name).read_bytes()
            check_bytes(name, data, expected)
            blobs[name] = data
    for required in (EMULATOR_WEIGHTS, ADAPTER_WEIGHTS, CONFIG):
        if required not in blobs:
            raise BundleError(f"{required}: the manifest does not list it; the bundle is incomplete")
    return manifest, manifest_bytes, blobs


class _KeptBytes(io.BytesIO):
    def close(self) -> None:  # the value is read after the copy closes its sink
        pass


def extract_bundle(
    archive: str | Path, dest: str | Path, public_key_path: str | Path | None, check_sig: bool = True
) -> dict:
    """Unpack a bundle tar into the new directory `dest`, only after its manifest is trusted.

    Files are written into a hidden sibling of `dest` (`offsite.files.atomic_dir`: same file
    system, never the system temp dir), each no larger than the manifest says and
    hash-checked as it streams, then the sibling is renamed to `dest`: a failure leaves
    nothing at `dest`. Returns the manifest."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists; refusing to unpack a bundle over it")
    manifest, manifest_bytes, sig_bytes, prefix = _read_tar_head(archive, public_key_path, check_sig)
    files = listed_files(manifest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    need = sum(f["size"] for f in files.values())
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise BundleError(f"{dest.parent}: the bundle needs {need} bytes, {free} are free; make room and retry")
    try:
        with atomic_dir(dest) as staging:
            _stream_tar_files(archive, prefix, files, lambda name: open(staging / name, "xb"))
            (staging / MANIFEST).write_bytes(manifest_bytes)
            if sig_bytes is not None:
                (staging / SIGNATURE).write_bytes(sig_bytes)
    except FileExistsError:
        raise BundleError(f"{dest} appeared while the bundle was unpacked; remove it or unpack elsewhere") from None
    return manifest


def bundle_summary(manifest: dict) -> dict:
    """The facts `emulator inspect` shows: blocks with origin/role/quantization, sizes, digests."""
    files = manifest.get("files", {})
    total = sum(f["size"] for f in files.values())
    base_bytes = manifest.get("base_model", {}).get("fp32_bytes")
    return {
        "format": manifest.get("format"),
        "base_model": manifest.get("base_model"),
        "plan": manifest.get("plan"),
        "layer_origin": [b["origin"] for b in manifest.get("blocks", [])],
        "blocks": manifest.get("blocks"),
        "quantization": manifest.get("quantization"),
        "files": files,
        "bundle_bytes": total,
        "ratio_to_base_fp32": (total / base_bytes) if base_bytes else None,
        "signer": manifest.get("signer"),
        "build": manifest.get("build"),
    }
