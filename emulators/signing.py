"""Ed25519 signing keys for bundles (PEM files, via `cryptography`).

The model owner signs every bundle manifest; data owners verify it with the public key
before loading a single tensor. The private key is written with mode 600 from the first
byte (never created readable and chmod-ed afterwards) and never overwritten by accident.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite.files import atomic_write

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"


class SigningKeyError(ValueError):
    """A key file is missing, unreadable, of the wrong kind, or would be overwritten."""


def generate_signing_key(directory: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Create DIR/signing.key (mode 600) and DIR/signing.pub; refuse to overwrite unless `force`."""
    directory = Path(directory)
    key_path, pub_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    existing = [p for p in (key_path, pub_path) if p.exists()]
    if existing and not force:
        raise SigningKeyError(
            f"{existing[0]} already exists; bundles signed with it would no longer verify if it were replaced. "
            "Pass --force to overwrite it, or choose another --dir"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SigningKeyError(
            f"{directory}: cannot create the key directory ({e.strerror}); choose a writable --dir"
        ) from None
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_atomic(key_path, private_pem, mode=0o600)
    _write_atomic(pub_path, public_pem, mode=0o644)
    return key_path, pub_path


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # atomic_write gives the temp file its mode before the first byte, so the secret is
    # never readable by others, not even for an instant.
    try:
        atomic_write(path, data, mode)
    except OSError as e:
        raise SigningKeyError(f"{path.parent}: not writable ({e.strerror}); choose a writable --dir") from None


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SigningKeyError(f"{path}: no such {what} file; create one with `offsite-admin keys init --dir DIR`")
    try:
        return path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"{path}: cannot read the {what} ({e.strerror})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file; a clear error for a public key or another kind."""
    data = _read(path, "signing key")
    if b"PUBLIC KEY" in data:
        raise SigningKeyError(
            f"{path}: this is a public key; signing needs the private key (signing.key, not signing.pub)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(
            f"{path}: not an unencrypted PEM private key ({e}); create one with `offsite-admin keys init`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"{path}: a {type(key).__name__}, but bundles are signed with Ed25519 keys; create one with `offsite-admin keys init`"
        )
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file."""
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        raise SigningKeyError(
            f"{path}: this is a private key; verification takes the public key (signing.pub) — never hand out signing.key"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path}: a {type(key).__name__}, but bundles are verified with Ed25519 keys")
    return key


def public_key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """sha256 of the raw public key bytes: names a key in manifests and error messages."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


KEY_ID_HEX = 16  # 64 bits of the fingerprint: names a key in a manifest, a keyring file, an error


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The short name of a key: the first 16 hex characters of its fingerprint."""
    return public_key_fingerprint(key)[:KEY_ID_HEX]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify_signature(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `key`'s signature over exactly `data`."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
