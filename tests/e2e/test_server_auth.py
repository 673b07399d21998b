"""Role x method matrix and data-owner scoping, against a real server on loopback."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory

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
    releases_pb2,
    releases_pb2_grpc,
)
from offsite.server.app import ServerThread
from offsite.server.auth import METHOD_ROLES
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

pytestmark = pytest.mark.e2e

SERVICE_MODULES = [admin_pb2, artifacts_pb2, jobs_pb2, models_pb2, releases_pb2]


def _all_methods():
    from offsite.protos.v1 import evals_pb2, operations_pb2

    out = []
    for module in (admin_pb2, artifacts_pb2, jobs_pb2, models_pb2, releases_pb2, evals_pb2, operations_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m))
    return out


def _upload(channel, path, kind="bundle"):
    def chunks():
        yield artifacts_pb2.UploadRequest(kind=kind, name=path.name)
        yield artifacts_pb2.UploadRequest(data=path.read_bytes())

    return artifacts_pb2_grpc.ArtifactsStub(channel).Upload(chunks())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    bundle = tiny_bundle()
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("srv"), port=0, signing_key=bundle.signing_key)
    server = ServerThread(cfg).start()
    admin = open_channel(server.address, server.admin_token)
    adm = admin_pb2_grpc.AdminStub(admin)
    models_pb2_grpc.ModelsStub(admin).RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    ref = _upload(admin, bundle.tar_path)
    emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
        models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
    )
    jobs = jobs_pb2_grpc.JobsStub(admin)
    job = jobs.CreateJob(jobs_pb2.CreateJobRequest(name="j1", spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    other = jobs.CreateJob(jobs_pb2.CreateJobRequest(name="j2", spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    secret = lambda name, role, jobs=(): adm.CreateToken(admin_pb2.CreateTokenRequest(name=name, role=role, jobs=jobs))
    tokens = {
        "admin": server.admin_token,
        "partner": secret("acme", "partner").secret,
        "data-owner": secret("alice", "data-owner", [job.id]).secret,
    }
    bob = secret("bob", "data-owner", [job.id])
    revoked = secret("eve", "partner")
    adm.RevokeToken(admin_pb2.RevokeTokenRequest(id=revoked.token.id))
    alice = open_channel(server.address, tokens["data-owner"])
    jobs_pb2_grpc.JobsStub(alice).Enroll(jobs_pb2.EnrollRequest(job_id=job.id))
    # A non-bundle artifact that a data owner must not read.
    secret_blob = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(
        iter([artifacts_pb2.UploadRequest(kind="adapter", name="x", data=b"private adapter bytes")])
    )
    yield {
        "server": server,
        "tokens": tokens,
        "job": job,
        "other": other,
        "bob": bob.secret,
        "revoked": revoked.secret,
        "bundle_sha": ref.sha256,
        "secret_sha": secret_blob.sha256,
        "emulator": emu,
    }
    server.stop()


def test_every_method_has_a_role_rule():
    missing = [name for name, _ in _all_methods() if name not in METHOD_ROLES]
    assert not missing, f"methods with no role rule (refused for all): {missing}"


def _invoke(channel, name, method_desc):
    cls = message_factory.GetMessageClass(method_desc.input_type)
    out = message_factory.GetMessageClass(method_desc.output_type)
    kw = dict(request_serializer=cls.SerializeToString, response_deserializer=out.FromString)
    if method_desc.client_streaming:
        return channel.stream_unary(name, **kw)(iter([cls()]), timeout=10)
    if method_desc.server_streaming:
        return list(channel.unary_stream(name, **kw)(cls(), timeout=10))
    return channel.unary_unary(name, **kw)(cls(), timeout=10)


def _code(fn):
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@pytest.mark.parametrize("role", ["admin", "partner", "data-owner", "none", "bogus", "revoked"])
def test_role_method_matrix(world, role):
    address = world["server"].address
    token = {"none": None, "bogus": "ofs_" + "x" * 43, "revoked": world["revoked"]}.get(role, world["tokens"].get(role))
    channel = open_channel(address, token)
    wrong = []
    for name, desc in _all_methods():
        code = _code(lambda name=name, desc=desc: _invoke(channel, name, desc))
        if role in ("none", "bogus", "revoked"):
            expected_ok = code == grpc.StatusCode.UNAUTHENTICATED
        elif role in METHOD_ROLES[name]:
            expected_ok = code not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNIMPLEMENTED,
            )
        else:
            expected_ok = code == grpc.StatusCode.PERMISSION_DENIED
        if not expected_ok:
            wrong.append((name, code.name))
    assert not wrong, f"role {role}: unexpected codes {wrong}"


def test_health_and_reflection_need_no_token(world):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(world["server"].address)
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="offsite.v1.Jobs"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"offsite.v1.Jobs", "offsite.v1.Artifacts", "offsite.v1.Releases", "grpc.health.v1.Health"} <= names


def test_data_owner_sees_only_enrolled_jobs_and_their_bundle(world):
    address = world["server"].address
    alice = open_channel(address, world["tokens"]["data-owner"])
    jobs = jobs_pb2_grpc.JobsStub(alice)
    listed = [j.id for j in jobs.ListJobs(jobs_pb2.ListJobsRequest()).jobs]
    assert listed == [world["job"].id]
    assert list(jobs.GetJob(jobs_pb2.GetJobRequest(id=world["job"].id)).data_owners) == []  # others stay private
    admin_jobs = jobs_pb2_grpc.JobsStub(open_channel(address, world["server"].admin_token))
    admin_jobs.Enroll(jobs_pb2.EnrollRequest(job_id=world["job"].id, data_owner="zed"))
    seen = [dict(e.data) for e in jobs.WatchJob(jobs_pb2.WatchJobRequest(id=world["job"].id)) if e.kind == "enrolled"]
    assert seen == [{"data_owner": "alice"}]
    all_seen = [
        e.data["data_owner"]
        for e in admin_jobs.WatchJob(jobs_pb2.WatchJobRequest(id=world["job"].id))
        if e.kind == "enrolled"
    ]
    assert all_seen == ["alice", "zed"]
    with pytest.raises(grpc.RpcError) as e:
        jobs.GetJob(jobs_pb2.GetJobRequest(id=world["other"].id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        jobs.Enroll(jobs_pb2.EnrollRequest(job_id=world["other"].id))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--job" in e.value.details()
    arts = artifacts_pb2_grpc.ArtifactsStub(alice)
    chunks = list(arts.Download(artifacts_pb2.DownloadRequest(sha256=world["bundle_sha"])))
    assert sum(len(c.data) for c in chunks) == chunks[0].total_size
    with pytest.raises(grpc.RpcError) as e:
        list(arts.Download(artifacts_pb2.DownloadRequest(sha256=world["secret_sha"])))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # bob holds a token for the job but has not enrolled: he sees nothing yet.
    bob = jobs_pb2_grpc.JobsStub(open_channel(address, world["bob"]))
    assert list(bob.ListJobs(jobs_pb2.ListJobsRequest()).jobs) == []
    with pytest.raises(grpc.RpcError) as e:
        list(
            artifacts_pb2_grpc.ArtifactsStub(open_channel(address, world["bob"])).Download(
                artifacts_pb2.DownloadRequest(sha256=world["bundle_sha"])
            )
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_only_admins_approve_and_actions_are_audited(world):
    from offsite.server.registry import Registry

    server = world["server"]
    reg: Registry = server.server.state.registry
    rel = reg.create_release(world["job"].id, world["emulator"].model_id, "")
    partner = releases_pb2_grpc.ReleasesStub(open_channel(server.address, world["tokens"]["partner"]))
    with pytest.raises(grpc.RpcError) as e:
        partner.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id, override_reason="ship it"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = releases_pb2_grpc.ReleasesStub(open_channel(server.address, server.admin_token))
    with pytest.raises(grpc.RpcError) as e:
        admin.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "override-reason" in e.value.details()
    approved = admin.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id, override_reason="manual review"))
    assert approved.status == "approved" and approved.decided_by == "admin"
    audit = admin_pb2_grpc.AdminStub(open_channel(server.address, server.admin_token)).ListAudit(
        admin_pb2.ListAuditRequest(method="ApproveRelease")
    )
    outcomes = {(a.actor, a.outcome) for a in audit.entries}
    assert ("admin", "ok") in outcomes and ("acme", "PERMISSION_DENIED") in outcomes
    assert ("admin", "FAILED_PRECONDITION") in outcomes


def test_bad_requests_get_actionable_codes(world):
    server = world["server"]
    admin = open_channel(server.address, server.admin_token)
    arts = artifacts_pb2_grpc.ArtifactsStub(admin)
    for bad, code in [("../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT), ("0" * 64, grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(grpc.RpcError) as e:
            list(arts.Download(artifacts_pb2.DownloadRequest(sha256=bad)))
        assert e.value.code() == code
    with pytest.raises(grpc.RpcError) as e:
        list(arts.Download(artifacts_pb2.DownloadRequest(sha256=world["bundle_sha"], offset=10**12)))
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    models = models_pb2_grpc.ModelsStub(admin)
    with pytest.raises(grpc.RpcError) as e:
        models.RegisterModel(models_pb2.RegisterModelRequest(name="evil", source="/etc"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "built-in" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        models.RegisterModel(models_pb2.RegisterModelRequest(name="evil2", source="../../x"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        jobs_pb2_grpc.JobsStub(admin).CreateJob(
            jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=world["emulator"].id, fraction=2.0))
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fraction" in e.value.details()
    # Oversized messages are refused by the server's own limit (this client would send them).
    from offsite.protos.channel import auth_metadata

    big = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    with pytest.raises(grpc.RpcError) as e:
        models_pb2_grpc.ModelsStub(big).RegisterModel(
            models_pb2.RegisterModelRequest(name="x", description="y" * (9 << 20)),
            metadata=auth_metadata(server.admin_token),
        )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
