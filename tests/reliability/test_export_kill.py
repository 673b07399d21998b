"""`kill -9` of `offsite-admin serve` while it exports an approved release, then a restart.

The exporter is slowed through `serve --release-exporter` (the hook writes a partial model
directory, then sleeps); the server's handling of the operation around it is the real one,
and the export after the restart is the real exporter on the tiny model.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time

from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    releases_pb2,
    releases_pb2_grpc,
)
from offsite.server.registry import Registry
from offsite.server.testing import tiny_bundle

from .test_server_kill import (
    FAILED,
    RUNNING,
    _server,
    _wait_done,
    _wait_state,
    assert_registry_intact,
    assert_store_whole,
)


def _upload(admin, kind: str, data: bytes) -> str:
    arts = artifacts_pb2_grpc.ArtifactsStub(admin)
    return arts.Upload(iter([artifacts_pb2.UploadRequest(kind=kind, data=data)])).sha256


def test_kill_during_a_release_export_keeps_the_release_approved_and_exports_again(tmp_path):
    bundle = tiny_bundle()
    srv = _server(
        tmp_path,
        "--signing-key",
        str(bundle.signing_key),
        "--release-exporter",
        "tests.reliability.slow_hooks:slow_export",
    ).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(
                model="tiny", bundle_sha256=_upload(admin, "bundle", bundle.tar_path.read_bytes())
            )
        )
        adapter = _upload(admin, "adapter", (bundle.bundle_dir / "adapter.safetensors").read_bytes())
        # A gated, approved candidate (the gate's own path is tests/e2e/test_server_flow.py).
        registry = Registry(f"sqlite:///{srv.data_dir / 'registry.db'}")
        job = registry.add_job("exported", emu.model_id, emu.id, {"rounds": 1})
        rel = registry.create_release(job.id, emu.model_id, adapter, {})
        registry.update_release(rel.id, status="approved", gate_verdict="pass")
        registry.close()

        op = releases_pb2_grpc.ReleasesStub(admin).ExportRelease(releases_pb2.ExportReleaseRequest(id=rel.id))
        ops = operations_pb2_grpc.OperationsStub(admin)
        _wait_state(ops, op.id, RUNNING)
        deadline = time.monotonic() + 60  # the exporter has written part of the model directory
        while not list((srv.data_dir / "work").glob(f"export-{op.id}-*/model/config.json")):
            assert time.monotonic() < deadline, "the slow exporter never started"
            time.sleep(0.1)
        srv.kill()
        admin.close()
        assert_store_whole(srv.data_dir)

        srv.extra_args = ["--signing-key", str(bundle.signing_key)]  # the real exporter from now on
        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        ops = operations_pb2_grpc.OperationsStub(admin)
        stale = ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        assert stale.state == FAILED and "server stopped" in stale.error
        releases = releases_pb2_grpc.ReleasesStub(admin)
        kept = releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id))
        assert kept.status == "approved", "a killed export changed the release"
        assert not kept.export.sha256, "a killed export left an export artifact on the release"
        leftovers = [p.name for p in (srv.data_dir / "work").iterdir() if op.id in p.name]
        assert not leftovers, f"scratch directories of the killed export were left: {leftovers}"
        with sqlite3.connect(srv.data_dir / "registry.db") as db:
            kinds = [k for (k,) in db.execute("SELECT kind FROM artifacts")]
        assert "model-export" not in kinds, "a half export was registered as an artifact"

        # The same export, started again, completes with the real exporter and serves a whole tar.
        done = _wait_done(ops, releases.ExportRelease(releases_pb2.ExportReleaseRequest(id=rel.id)).id)
        assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
        released = releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id))
        assert released.status == "released" and released.export.sha256
        arts = artifacts_pb2_grpc.ArtifactsStub(admin)
        tar = b"".join(c.data for c in arts.Download(artifacts_pb2.DownloadRequest(sha256=released.export.sha256)))
        assert hashlib.sha256(tar).hexdigest() == released.export.sha256
    finally:
        srv.kill()
    assert_store_whole(srv.data_dir)
    assert_registry_intact(srv.data_dir)
