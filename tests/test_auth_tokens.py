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


def test_rotation_beats_the_cache_and_moves_the_enrollments(auth):
    reg = auth.registry
    model = reg.add_model("m", "tiny-llama")
    sha = "ab" * 32
    reg.add_artifact(sha, 1, "bundle", "b.tar")
    job = reg.add_job("j", model.id, reg.add_emulator(model.id, sha, {}, {}).id, {})
    secret, row = auth.create_token("alice", "data-owner", [job.id], ttl_seconds=600)
    reg.enroll(job.id, "alice", row.id)
    assert auth.authenticate(f"Bearer {secret}").name == "alice"  # now cached for 60 s
    new_secret, new = auth.rotate(row.id)
    with pytest.raises(_AuthError, match="revoked"):
        auth.authenticate(f"Bearer {secret}")
    p = auth.authenticate(f"Bearer {new_secret}")
    assert (p.name, p.role, list(p.jobs), p.token_id) == ("alice", "data-owner", [job.id], new.id)
    assert reg.jobs_of_token(new.id) == [job.id] and reg.jobs_of_token(row.id) == []
    assert reg.enrolled_data_owners(job.id) == ["alice"]
    assert 590 <= (new.expires_at - new.created_at).total_seconds() <= 610  # the old lifetime
    with pytest.raises(ValueError, match="revoked"):
        auth.rotate(row.id)  # a revoked token is not brought back
