"""Tokens: hashed at rest, revocation and expiry take effect, clear refusals."""

from __future__ import annotations

import time

import pytest

from offsite.server.auth import Authenticator, _AuthError, hash_secret
from offsite.server.registry import Registry


@pytest.fixture
def auth(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    yield Authenticator(reg, cache_ttl_s=60)
    reg.close()


def test_secret_is_stored_only_as_a_hash(auth, tmp_path):
    secret, row = auth.create_token("acme", "partner")
    assert secret.startswith("ofs_") and len(secret) > 40
    assert row.secret_hash == hash_secret(secret)
    assert secret.encode() not in (tmp_path / "r.db").read_bytes()


def test_revocation_beats_the_cache(auth):
    secret, row = auth.create_token("acme", "partner")
    assert auth.authenticate(f"Bearer {secret}").role == "partner"  # now cached for 60 s
    auth.revoke(row.id)
    with pytest.raises(_AuthError, match="revoked"):
        auth.authenticate(f"Bearer {secret}")


def test_expiry_and_malformed_headers(auth):
    secret, _ = auth.create_token("short", "admin", ttl_seconds=1)
    assert auth.authenticate(f"Bearer {secret}").name == "short"
    time.sleep(1.1)
    with pytest.raises(_AuthError, match="expired"):
        auth.authenticate(f"Bearer {secret}")
    with pytest.raises(_AuthError, match="missing"):
        auth.authenticate(None)
    with pytest.raises(_AuthError, match="malformed"):
        auth.authenticate(f"Basic {secret}")
    with pytest.raises(ValueError, match="role"):
        auth.create_token("x", "root")
