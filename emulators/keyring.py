"""Signing-key rotation: a keyring of every public key that ever signed a bundle.

A key directory holds the current pair (signing.key, signing.pub) and, beside it,
``keyring/<key id>.pub`` for every public key it has used, the current one included.
Rotation writes a new pair and keeps the old public key in the keyring, so bundles signed
before still verify while new ones are signed by the new key. A manifest names its key id
(``signer.key_id``, or the first 16 hex of ``signer.ed25519_sha256`` in older manifests),
which picks the key to check it with; the key id only selects, the signature still decides.

Key ids are computed from the file contents, never taken from file names, so a
misnamed or planted file cannot stand in for another key.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.files import atomic_write

from .signing import (
    KEY_ID_HEX,
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    SigningKeyError,
    generate_signing_key,
    key_id,
    load_public_key,
)

KEYRING_DIR = "keyring"
_KEY_ID = re.compile(rf"^[0-9a-f]{{{KEY_ID_HEX}}}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def manifest_key_id(manifest: object) -> str | None:
    """The key id a manifest names, or None for a manifest that names none."""
    signer = manifest.get("signer") if isinstance(manifest, dict) else None
    if not isinstance(signer, dict):
        return None
    kid, fingerprint = signer.get("key_id"), signer.get("ed25519_sha256")
    if isinstance(kid, str) and _KEY_ID.match(kid):
        return kid
    if isinstance(fingerprint, str) and _FINGERPRINT.match(fingerprint):
        return fingerprint[:KEY_ID_HEX]
    return None


def load_keyring(path: str | Path) -> dict[str, tuple[Ed25519PublicKey, Path]]:
    """{key id: (key, file)} for a public key file, or for a directory: its *.pub files and
    those of its keyring/ (so a key directory, or its keyring alone, both work)."""
    path = Path(path)
    if not path.is_dir():
        key = load_public_key(path)
        return {key_id(key): (key, path)}
    files = sorted(path.glob("*.pub")) + sorted((path / KEYRING_DIR).glob("*.pub"))
    if not files:
        raise SigningKeyError(
            f"{path}: no *.pub public keys in it (nor in its {KEYRING_DIR}/); pass the model "
            "owner's signing.pub or a key directory"
        )
    ring: dict[str, tuple[Ed25519PublicKey, Path]] = {}
    for f in files:
        key = load_public_key(f)
        ring.setdefault(key_id(key), (key, f))
    return ring


def remember_public_key(key_dir: str | Path, pub_path: str | Path | None = None) -> str:
    """Put a public key (default: KEY_DIR/signing.pub) into KEY_DIR/keyring/; its key id."""
    key_dir = Path(key_dir)
    pub_path = Path(pub_path) if pub_path is not None else key_dir / PUBLIC_KEY_NAME
    data = pub_path.read_bytes()
    kid = key_id(load_public_key(pub_path))
    target = key_dir / KEYRING_DIR / f"{kid}.pub"
    if not target.is_file() or target.read_bytes() != data:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data, 0o644)
        except OSError as e:
            raise SigningKeyError(
                f"{target.parent}: not writable ({e.strerror}); the keyring must sit beside signing.key"
            ) from None
    return kid


def rotate_signing_key(key_dir: str | Path) -> dict[str, object]:
    """Replace KEY_DIR's signing pair with a new one, keeping every old public key.

    Order matters for a server signing from this directory while it runs: the old and the
    new public keys reach the keyring before the new private key replaces the old one, so
    any bundle signed at any instant has its key in the keyring."""
    key_dir = Path(key_dir)
    if not (key_dir / PRIVATE_KEY_NAME).is_file() or not (key_dir / PUBLIC_KEY_NAME).is_file():
        raise SigningKeyError(
            f"{key_dir}: no {PRIVATE_KEY_NAME} and {PUBLIC_KEY_NAME} to rotate; create them with "
            f"`offsite-admin keys init --dir {key_dir}`"
        )
    old_id = remember_public_key(key_dir)
    staging = key_dir / KEYRING_DIR / ".new"
    if staging.exists():
        for f in staging.iterdir():  # a rotation interrupted before its swap: start it over
            f.unlink()
    new_key, new_pub = generate_signing_key(staging, force=True)
    new_id = remember_public_key(key_dir, new_pub)
    atomic_write(key_dir / PRIVATE_KEY_NAME, new_key.read_bytes(), 0o600)
    atomic_write(key_dir / PUBLIC_KEY_NAME, new_pub.read_bytes(), 0o644)
    new_key.unlink()
    new_pub.unlink()
    staging.rmdir()
    return {
        "key_id": new_id,
        "previous_key_id": old_id,
        "signing_key": str(key_dir / PRIVATE_KEY_NAME),
        "signing_pub": str(key_dir / PUBLIC_KEY_NAME),
        "keyring": sorted(load_keyring(key_dir / KEYRING_DIR)),
    }


def trusted_keys(key_dir: str | Path) -> dict[str, tuple[Ed25519PublicKey, Path]]:
    """KEY_DIR/signing.pub and KEY_DIR/keyring/*.pub, and no other file of KEY_DIR (a key
    directory given with --signing-key may hold unrelated .pub files). A key in both is given
    by its keyring file: signing.pub changes at the next rotation, keyring/<key id>.pub never."""
    key_dir = Path(key_dir)
    ring = load_keyring(key_dir / PUBLIC_KEY_NAME)
    if (key_dir / KEYRING_DIR).is_dir() and any((key_dir / KEYRING_DIR).glob("*.pub")):
        ring = {**ring, **load_keyring(key_dir / KEYRING_DIR)}
    return ring


def public_key_file(key_dir: str | Path, manifest: object) -> Path:
    """The public key file that verifies `manifest`'s bundle: the keyring entry for the key id
    it names, or KEY_DIR/signing.pub for a manifest that names none."""
    key_dir = Path(key_dir)
    kid = manifest_key_id(manifest)
    if kid is None:
        return key_dir / PUBLIC_KEY_NAME
    ring = trusted_keys(key_dir)
    if kid not in ring:
        raise SigningKeyError(
            f"the bundle was signed by key id {kid}, which is not in {key_dir} (key ids "
            f"{', '.join(sorted(ring))}); put that key's signing.pub into {key_dir / KEYRING_DIR}/"
        )
    return ring[kid][1]
