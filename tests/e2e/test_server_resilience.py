"""The server as a process: killed mid-download (the client resumes), killed outright
(nothing acknowledged is lost), stopped gracefully (operations are cancelled cleanly)."""

from __future__ import annotations

import hashlib
import os
import time

import grpc
import pytest

from offsite.client.fetch import download_artifact
from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    artifacts_pb2,
    artifacts_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    releases_pb2,
    releases_pb2_grpc,
)
from offsite.server.artifacts import ArtifactStore
from offsite.server.registry import Registry
from offsite.server.testing import ServerProcess, tiny_bundle

pytestmark = pytest.mark.e2e


def _upload(channel, path, kind="bundle"):
    def chunks():
        yield artifacts_pb2.UploadRequest(kind=kind, name=path.name)
        with open(path, "rb") as fh:
            while data := fh.read(1 << 20):
                yield artifacts_pb2.UploadRequest(data=data)

    return artifacts_pb2_grpc.ArtifactsStub(channel).Upload(chunks())


def _setup_job(address, admin_token, bundle):
    admin = open_channel(address, admin_token)
    models_pb2_grpc.ModelsStub(admin).RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    ref = _upload(admin, bundle.tar_path)
    emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
        models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
    )
    job = jobs_pb2_grpc.JobsStub(admin).CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    tok = admin_pb2_grpc.AdminStub(admin).CreateToken(
        admin_pb2.CreateTokenRequest(name="alice", role="data-owner", jobs=[job.id])
    )
    return admin, emu, job, tok.secret


def test_download_resumes_after_the_server_is_killed(tmp_path):
    """The client's resumable download (what `offsite-client fetch` uses) survives a crash.

    The artifact is large (64 MiB) so that the kill lands while bytes are still in flight:
    a small one would already sit in the client's HTTP/2 window.
    """
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        admin_token = srv.admin_token
        blob = tmp_path / "big.bin"
        blob.write_bytes(os.urandom(64 << 20))
        ref = _upload(open_channel(srv.address, admin_token), blob, kind="blob")
        killed = []

        def on_progress(done, total):
            if not killed and done >= total // 4:
                killed.append(done)
                srv.kill()  # mid-stream, as in a crash
                srv.start()  # same port, same data directory

        part = tmp_path / "cache" / "big.part"
        size, downloaded, resumes = download_artifact(
            lambda: open_channel(srv.address, admin_token),
            ref.sha256,
            part,
            on_progress=on_progress,
            chunk_size=64 * 1024,
        )
        assert killed and killed[0] < size and resumes >= 1
        # Resumed from the byte where it stopped: nothing was downloaded twice.
        assert size == downloaded == blob.stat().st_size
        assert hashlib.sha256(part.read_bytes()).hexdigest() == ref.sha256
    finally:
        srv.kill()


def test_restart_after_kill_loses_nothing_acknowledged(tmp_path):
    bundle = tiny_bundle()
    srv = ServerProcess(tmp_path / "srv", extra_args=["--signing-key", str(bundle.signing_key)]).start()
    try:
        admin_token = srv.admin_token
        admin, emu, job, alice_token = _setup_job(srv.address, admin_token, bundle)
        adm = admin_pb2_grpc.AdminStub(admin)
        partner = adm.CreateToken(admin_pb2.CreateTokenRequest(name="acme", role="partner"))
        gone = adm.CreateToken(admin_pb2.CreateTokenRequest(name="gone", role="partner"))
        adm.RevokeToken(admin_pb2.RevokeTokenRequest(id=gone.token.id))
        jobs_pb2_grpc.JobsStub(open_channel(srv.address, alice_token)).Enroll(jobs_pb2.EnrollRequest(job_id=job.id))
        blob = b"acknowledged bytes " * 1000
        ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(
            iter([artifacts_pb2.UploadRequest(kind="blob", data=blob)])
        )
        # An operation in flight when the process dies.
        op = models_pb2_grpc.EmulatorsStub(admin).BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny"))
        srv.kill()

        assert "first start: wrote the admin token" in srv.log.read_text()
        srv.start()
        assert srv.admin_token == admin_token  # not re-created
        assert srv.log.read_text().count("first start") == 1
        admin = open_channel(srv.address, admin_token)
        assert [
            m.name for m in models_pb2_grpc.ModelsStub(admin).ListModels(models_pb2.ListModelsRequest()).models
        ] == ["tiny"]
        got_job = jobs_pb2_grpc.JobsStub(admin).GetJob(jobs_pb2.GetJobRequest(id=job.id))
        assert list(got_job.data_owners) == ["alice"]
        data = b"".join(
            c.data
            for c in artifacts_pb2_grpc.ArtifactsStub(admin).Download(artifacts_pb2.DownloadRequest(sha256=ref.sha256))
        )
        assert hashlib.sha256(data).hexdigest() == ref.sha256 and data == blob
        who = admin_pb2_grpc.IdentityStub(open_channel(srv.address, partner.secret)).WhoAmI(admin_pb2.WhoAmIRequest())
        assert who.name == "acme" and who.role == "partner"
        with pytest.raises(grpc.RpcError) as e:
            admin_pb2_grpc.IdentityStub(open_channel(srv.address, gone.secret)).WhoAmI(admin_pb2.WhoAmIRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        audit = adm = admin_pb2_grpc.AdminStub(admin).ListAudit(admin_pb2.ListAuditRequest(limit=100))
        assert {"CreateToken", "RevokeToken", "RegisterModel", "Enroll"} <= {
            a.method.rsplit("/", 1)[1] for a in audit.entries
        }
        stale = operations_pb2_grpc.OperationsStub(admin).GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        assert stale.state in (operations_pb2.OPERATION_STATE_FAILED, operations_pb2.OPERATION_STATE_SUCCEEDED)
        if stale.state == operations_pb2.OPERATION_STATE_FAILED:
            assert "start it again" in stale.error
    finally:
        srv.kill()
    # Every blob under its final name is whole: crashes leave at most temp files.
    store = ArtifactStore(tmp_path / "srv" / "artifacts")
    blobs = [p for p in store.blobs.rglob("*") if p.is_file()]
    assert blobs and all(store.verify(p.name) for p in blobs)


def test_graceful_shutdown_cancels_running_operations(tmp_path):
    bundle = tiny_bundle()
    srv = ServerProcess(tmp_path / "srv", extra_args=["--signing-key", str(bundle.signing_key), "--grace", "0"]).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        op = models_pb2_grpc.EmulatorsStub(admin).BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny"))
        time.sleep(0.3)
        assert srv.terminate(timeout=60) == 0
        admin.close()
        reg = Registry(f"sqlite:///{tmp_path / 'srv' / 'registry.db'}")
        row = reg.get_operation(op.id)
        reg.close()
        assert row.state in ("cancelled", "succeeded"), row.error  # never left "running"
        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        again = operations_pb2_grpc.OperationsStub(admin).GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        assert again.done
        # The release API still answers after the restart.
        releases_pb2_grpc.ReleasesStub(admin).ListReleases(releases_pb2.ListReleasesRequest())
    finally:
        srv.kill()
