"""`offsite-admin backup` / `restore`: a running server's registry and artifacts, restored into a
fresh server (SQLite -> SQLite, and SQLite -> PostgreSQL when a server can start), where a data
owner enrolls with the token issued before the backup and fetches the bundle, verified.
Broken or mismatched backups are refused with nothing restored.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from offsite.client.fetch import enroll, fetch_bundle
from offsite.protos.channel import open_channel
from offsite.protos.v1 import admin_pb2, admin_pb2_grpc, artifacts_pb2, artifacts_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from offsite.protos.v1 import models_pb2, models_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.backup import BackupError, backup, restore
from offsite.server.postgres import PostgresUnavailable, server_for_tests
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

ADMIN = str(Path(sys.executable).parent / "offsite-admin")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A server with a model, a bundle, a job and a data-owner token; backed up while it runs."""
    bundle = tiny_bundle()
    data = tmp_path_factory.mktemp("orig") / "srv"
    (data / "keys").mkdir(parents=True)  # the server's own key pair (the tiny bundle is signed with it)
    key = Path(bundle.signing_key)
    shutil.copy(key, data / "keys" / "signing.key")
    shutil.copy(key.with_suffix(".pub"), data / "keys" / "signing.pub")
    s = ServerThread(ServerConfig(data_dir=data, port=0)).start()
    admin = open_channel(s.address, s.admin_token)
    models_pb2_grpc.ModelsStub(admin).RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    chunks = [
        artifacts_pb2.UploadRequest(kind="bundle", name="b.tar"),
        artifacts_pb2.UploadRequest(data=bundle.tar_path.read_bytes()),
    ]
    ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(iter(chunks))
    emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
        models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
    )
    job = jobs_pb2_grpc.JobsStub(admin).CreateJob(
        jobs_pb2.CreateJobRequest(name="j", spec=jobs_pb2.JobSpec(emulator_id=emu.id))
    )
    token = (
        admin_pb2_grpc.AdminStub(admin)
        .CreateToken(admin_pb2.CreateTokenRequest(name="alice", role="data-owner", jobs=[job.id]))
        .secret
    )
    out = data.parent / "backup"
    proc = subprocess.run(
        [ADMIN, "backup", "--data-dir", str(data), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    s.stop()
    assert proc.returncode == 0, proc.stderr
    return {
        "backup": out,
        "manifest": json.loads(proc.stdout),
        "job": job.id,
        "token": token,
        "sha": ref.sha256,
        "admin_token": (data / "admin.token").read_text().strip(),
        "keys": data / "keys",
    }


def _fetch_from_restored(restored: Path, original: dict, tmp_path: Path, database_url: str | None = None) -> None:
    s = ServerThread(ServerConfig(data_dir=restored, port=0, database_url=database_url)).start()
    try:
        # The admin token and the data owner's token from before the backup both work.
        jobs = jobs_pb2_grpc.JobsStub(open_channel(s.address, original["admin_token"]))
        assert jobs.GetJob(jobs_pb2.GetJobRequest(id=original["job"])).id == original["job"]
        # Pinned to the signing key from before the backup: the restored server signs with the same key.
        e = enroll(
            s.address,
            original["token"],
            original["job"],
            home=tmp_path / "home",
            public_key=original["keys"] / "signing.pub",
        )
        assert e.bundle_sha256 == original["sha"]
        got = fetch_bundle(e, original["token"], cache_dir=tmp_path / "cache")
        assert got.sha256 == original["sha"] and (got.path / "manifest.json").is_file() and got.downloaded > 0
        # Ids keep counting after the restored rows (the audit log appends, enrollments too).
        admin = admin_pb2_grpc.AdminStub(open_channel(s.address, original["admin_token"]))
        admin.CreateToken(admin_pb2.CreateTokenRequest(name="bob", role="data-owner", jobs=[original["job"]]))
    finally:
        s.stop()


def test_backup_is_complete_and_private(original):
    b, m = original["backup"], original["manifest"]
    assert (b / "manifest.json").is_file() and oct(b.stat().st_mode & 0o777) == "0o700"
    assert m["rows"]["jobs"] == 1 and m["rows"]["tokens"] >= 2 and original["sha"] in m["artifacts"]
    assert (b / "keys" / "signing.key").read_bytes() == (original["keys"] / "signing.key").read_bytes()
    assert not list(b.parent.glob(".backup.partial-*"))


def test_restore_into_a_fresh_server_and_fetch_the_bundle(original, tmp_path):
    restored = tmp_path / "srv2"
    proc = subprocess.run(
        [ADMIN, "restore", "--from", str(original["backup"]), "--data-dir", str(restored)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _fetch_from_restored(restored, original, tmp_path)


def test_restore_into_postgresql(original, tmp_path):
    try:
        pg = server_for_tests()
    except PostgresUnavailable as e:
        if os.environ.get("OFFSITE_REQUIRE_POSTGRES") == "1":
            pytest.fail(str(e))
        pytest.skip(f"no PostgreSQL server: {e}")
    try:
        url = pg.create_database(f"restore_{uuid.uuid4().hex[:12]}")
        restore(original["backup"], tmp_path / "srv3", url)
        _fetch_from_restored(tmp_path / "srv3", original, tmp_path, database_url=url)
    finally:
        pg.stop()


def test_bad_backups_and_targets_are_refused(original, tmp_path):
    # A restore target that already has data.
    with pytest.raises(BackupError, match="not empty"):
        restore(original["backup"], _restored_copy(original, tmp_path / "busy"))
    # A damaged artifact: nothing is restored (no registry rows, the store keeps no bad blob).
    broken = tmp_path / "broken"
    shutil.copytree(original["backup"], broken)
    (broken / "artifacts" / original["sha"]).write_bytes(b"x" * original["manifest"]["artifacts"][original["sha"]])
    with pytest.raises(BackupError, match="does not match its digest"):
        restore(broken, tmp_path / "t1")
    from offsite.server.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 't1' / 'registry.db'}")
    assert reg.list_jobs() == [] and reg.count_tokens() == 0
    reg.close()
    # Not a (finished) backup; a backup from another schema revision.
    with pytest.raises(BackupError, match="no manifest.json"):
        restore(tmp_path, tmp_path / "t2")
    other = tmp_path / "other"
    shutil.copytree(original["backup"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "revision": ["9999_future"]}))
    with pytest.raises(BackupError, match="9999_future"):
        restore(other, tmp_path / "t3")
    # backup never overwrites.
    with pytest.raises(BackupError, match="already exists"):
        backup(tmp_path / "t1", None, original["backup"])


def _restored_copy(original: dict, target: Path) -> Path:
    restore(original["backup"], target)
    return target


def test_cli_errors_are_clear(tmp_path):
    proc = subprocess.run(
        [ADMIN, "restore", "--from", str(tmp_path), "--data-dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode == 1 and "no manifest.json" in said and "Traceback" not in said
