"""The probe's low-severity findings (issue 10.7), each replayed against a real server."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import grpc
import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from offsite.server.app import ServerThread
from offsite.server.state import ServerConfig

pytestmark = pytest.mark.e2e

BIG = "x" * 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("srv"), port=0, background_tasks=[])
    s = ServerThread(cfg).start()
    reg = s.server.state.registry
    model = reg.add_model("m", "tiny-llama")
    emu = reg.add_emulator(model.id, "0" * 64, {}, {})
    s.job = reg.add_job("j", model.id, emu.id, {"rounds": 1})
    yield s
    s.stop()


def _code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _raw(server, method, token=None):
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    md = [("authorization", f"Bearer {token}")] if token else None
    return lambda data: call(data, metadata=md, timeout=10)


def _deep_struct_options(depth: int) -> bytes:
    """CreateJobRequest{spec{options: Struct nested `depth` deep}} as raw bytes (the probe built it by hand)."""

    def ld(tag: int, payload: bytes) -> bytes:
        n, out = len(payload), b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                break
        return bytes([tag]) + out + payload

    struct = b""
    for _ in range(depth):
        value = ld(0x2A, struct)  # Value.struct_value = 5
        entry = ld(0x0A, b"a") + ld(0x12, value)  # map entry key=1, value=2
        struct = ld(0x0A, entry)  # Struct.fields = 1
    return ld(0x12, ld(0x3A, struct))  # CreateJobRequest.spec = 2, JobSpec.options = 7


def test_garbage_and_deep_structs_get_clean_codes_without_tracebacks(server, caplog):
    caplog.set_level(logging.INFO)
    for payload in (b"\xff\xff\xff\xff\x0f garbage", _deep_struct_options(120)):
        code, _ = _code(lambda payload=payload: _raw(server, "/offsite.v1.Jobs/CreateJob")(payload))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, details = _code(
            lambda payload=payload: _raw(server, "/offsite.v1.Jobs/CreateJob", server.admin_token)(payload)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "offsite.v1 protos" in details
    assert "Traceback" not in caplog.text and "Unexpected" not in caplog.text


def test_bounds_on_ttl_and_audit_filter_and_no_echo(server):
    admin = admin_pb2_grpc.AdminStub(open_channel(server.address, server.admin_token))
    code, details = _code(
        lambda: admin.CreateToken(admin_pb2.CreateTokenRequest(name="t", role="partner", ttl_seconds=2**62))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in details
    code, details = _code(lambda: admin.ListAudit(admin_pb2.ListAuditRequest(method=BIG)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "SELECT" not in details and len(details) < 500
    big = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    from offsite.protos.channel import auth_metadata

    models = models_pb2_grpc.ModelsStub(big)
    for call in (
        lambda: models.GetModel(
            models_pb2.GetModelRequest(id=BIG[:100_000]), metadata=auth_metadata(server.admin_token)
        ),
        lambda: models.RegisterModel(
            models_pb2.RegisterModelRequest(name=BIG), metadata=auth_metadata(server.admin_token)
        ),
    ):
        code, details = _code(call)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert len(details) <= 1100 and "x" * 100 not in details


def test_errors_name_no_absolute_server_path(server):
    models = models_pb2_grpc.ModelsStub(open_channel(server.address, server.admin_token))
    code, details = _code(
        lambda: models.RegisterModel(models_pb2.RegisterModelRequest(name="nodir", source="no-such-dir"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no-such-dir" in details
    data_dir = str(server.server.state.data_dir)
    assert data_dir not in details and "/tmp" not in details and "DATA_DIR" in details


def test_refusals_are_audited_including_unauthenticated_and_not_found(server):
    jobs = jobs_pb2_grpc.JobsStub(open_channel(server.address, server.admin_token))
    _code(lambda: jobs_pb2_grpc.JobsStub(open_channel(server.address, None)).GetJob(jobs_pb2.GetJobRequest(id="job_x")))
    _code(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(id="job_missing")))
    audit = (
        admin_pb2_grpc.AdminStub(open_channel(server.address, server.admin_token))
        .ListAudit(admin_pb2.ListAuditRequest(method="GetJob"))
        .entries
    )
    outcomes = {(a.actor, a.outcome) for a in audit}
    assert ("(unauthenticated)", "UNAUTHENTICATED") in outcomes and ("admin", "NOT_FOUND") in outcomes


def test_watch_streams_per_data_owner_are_limited_and_cancel_cleanly(server, caplog):
    caplog.set_level(logging.INFO)
    admin = admin_pb2_grpc.AdminStub(open_channel(server.address, server.admin_token))
    tok = admin.CreateToken(admin_pb2.CreateTokenRequest(name="dora", role="data-owner", jobs=[server.job.id])).secret
    ch = open_channel(server.address, tok)
    jobs = jobs_pb2_grpc.JobsStub(ch)
    jobs.Enroll(jobs_pb2.EnrollRequest(job_id=server.job.id))
    limit = server.server.state.config.max_watch_streams_per_data_owner
    streams = [jobs.WatchJob(jobs_pb2.WatchJobRequest(id=server.job.id, follow=True)) for _ in range(limit)]
    for st in streams:
        next(st)  # each stream is open and has sent its first event
    code, details = _code(lambda: next(jobs.WatchJob(jobs_pb2.WatchJobRequest(id=server.job.id, follow=True))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "close one" in details
    for st in streams:
        st.cancel()
    time.sleep(1.0)
    again = jobs.WatchJob(jobs_pb2.WatchJobRequest(id=server.job.id, follow=True))
    assert next(again).kind == "created"
    again.cancel()
    time.sleep(0.5)
    assert "different Context" not in caplog.text


def test_the_admin_token_can_be_rotated(server):
    old = server.admin_token
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.server.cli.main",
            "tokens",
            "rotate-admin",
            "--data-dir",
            str(server.server.state.data_dir),
            "--ttl",
            "3600",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    new = server.admin_token
    assert new != old
    who = admin_pb2_grpc.IdentityStub(open_channel(server.address, new)).WhoAmI(admin_pb2.WhoAmIRequest())
    assert who.role == "admin"
    deadline = time.monotonic() + 10  # the server's auth cache holds a token for a few seconds
    while time.monotonic() < deadline:
        code, _ = _code(
            lambda: admin_pb2_grpc.IdentityStub(open_channel(server.address, old)).WhoAmI(admin_pb2.WhoAmIRequest())
        )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            break
        time.sleep(0.5)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    row = server.server.state.registry.get_token(who.token_id)
    assert row.expires_at is not None
