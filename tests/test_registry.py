"""Registry (SQLAlchemy + SQLite) and the content-addressed artifact store."""

from __future__ import annotations

import hashlib
import os
import sqlite3

import pytest

from offsite.server.artifacts import ArtifactNotFound, ArtifactStore, BlobWriter, InvalidDigest
from offsite.server.registry import Conflict, NotFound, Registry


@pytest.fixture
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path}/r.db")
    yield r
    r.close()


def test_schema_created_and_version_recorded(reg):
    assert reg.schema_version() >= 1
    names = set(reg.engine.dialect.get_table_names(reg.engine.connect()))
    for table in (
        "models",
        "emulators",
        "artifacts",
        "jobs",
        "enrollments",
        "rounds",
        "releases",
        "eval_reports",
        "eval_schedules",
        "tokens",
        "audit",
        "operations",
    ):
        assert table in names


def test_additive_migration_adds_missing_columns(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    # An older schema: the releases table without most of today's columns.
    con.execute("CREATE TABLE releases (id VARCHAR(32) PRIMARY KEY, job_id VARCHAR(32), status VARCHAR(16))")
    con.execute("INSERT INTO releases (id, job_id, status) VALUES ('rel_old', 'job_x', 'approved')")
    con.commit()
    con.close()
    reg = Registry(f"sqlite:///{db}")
    row = reg.get_release("rel_old")
    assert row.status == "approved" and row.gate_verdict == "" and row.reason == ""
    reg.update_release("rel_old", reason="kept")
    assert reg.get_release("rel_old").reason == "kept"
    reg.close()


def test_models_unique_and_lookup_by_name(reg):
    m = reg.add_model("tiny", "tiny-llama", family="llama", num_layers=8)
    assert reg.get_model("tiny").id == m.id == reg.get_model(m.id).id
    with pytest.raises(Conflict):
        reg.add_model("tiny", "tiny-gpt2")
    with pytest.raises(NotFound, match="models list"):
        reg.get_model("nope")


def test_jobs_rounds_events_release(reg):
    m = reg.add_model("tiny", "tiny-llama")
    e = reg.add_emulator(m.id, "a" * 64, {}, {})
    job = reg.add_job("j", m.id, e.id, {"rounds": 2})
    _, created = reg.enroll(job.id, "alice")
    _, again = reg.enroll(job.id, "alice")
    assert created and not again
    assert reg.jobs_of_data_owner("alice") == [job.id]
    reg.update_job(job.id, state="running")
    reg.add_round(job.id, 1, {"plugin_ppl": 12.5})
    reg.add_round(job.id, 2, {"plugin_ppl": 11.0})
    assert reg.get_job(job.id).current_round == 2
    rel = reg.create_release(job.id, m.id, "b" * 64, {"plugin_ppl": 11.0})
    assert rel.status == "pending-gate" and reg.get_job(job.id).release_id == rel.id
    kinds = [ev.kind for ev in reg.job_events(job.id)]
    assert kinds == ["created", "enrolled", "state", "round", "round", "release"]
    assert [ev.seq for ev in reg.job_events(job.id, after_seq=4)] == [5, 6]
    with pytest.raises(Conflict, match="needs one of"):
        reg.update_release(rel.id, expect_status=("approved",), status="released")
    with pytest.raises(ValueError):
        reg.update_job(job.id, state="exploded")


def test_store_is_content_addressed_and_atomic(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    data = os.urandom(3 << 20)
    sha = store.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha).read_bytes() == data and store.verify(sha)
    assert store.put_bytes(data) == sha  # idempotent
    assert list(store.tmp.iterdir()) == []  # no temp file left behind
    with pytest.raises(InvalidDigest):
        store.path("../../etc/passwd")
    with pytest.raises(ArtifactNotFound):
        store.open("0" * 64)
    with pytest.raises(InvalidDigest, match="altered"):
        store.put_stream([b"abc"], expected_sha256="0" * 64)
    assert list(store.tmp.iterdir()) == []


def test_blob_writer_limit_and_abort(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    w = BlobWriter(store, max_bytes=10)
    w.write(b"12345")
    with pytest.raises(ValueError, match="limit"):
        w.write(b"1234567")
    assert list(store.tmp.iterdir()) == []


def test_dir_tar_is_reproducible(tmp_path):
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(b"\0\1")
    store = ArtifactStore(tmp_path / "s")
    first = store.put_dir_as_tar(src)
    os.utime(src / "a.txt", (1, 1))
    assert store.put_dir_as_tar(src) == first
