"""`offsite-admin tokens rotate` (issue 15, section 4): a new secret for the same name, role
and jobs, enrollments carried over, the old secret refused at once; expiry kept or reset.
A real server on loopback, the real CLI."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from offsite.protos.channel import open_channel
from offsite.protos.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.cli.main import app as admin_app
from offsite.server.state import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    with ServerThread(ServerConfig(data_dir=root / "srv", port=0)) as srv:
        state = srv.server.state
        blob = root / "bundle.tar"
        blob.write_bytes(b"not read by Enroll")
        sha = state.store.put_file(blob)
        state.registry.add_artifact(sha, state.store.size(sha), "bundle", blob.name)
        model = state.registry.add_model("tok-base", "tiny-llama")
        emu = state.registry.add_emulator(model.id, sha, {}, {})
        srv.admin = open_channel(srv.address, srv.admin_token)
        srv.job = (
            jobs_pb2_grpc.JobsStub(srv.admin)
            .CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
            .id
        )
        yield srv
        srv.admin.close()


def _cli(server, *args: str, token: str | None = None):
    env = {"OFFSITE_SERVER": server.address, "OFFSITE_TOKEN": token or server.admin_token}
    return CliRunner().invoke(admin_app, list(args), env=env)


def _whoami(server, secret: str):
    ch = open_channel(server.address, secret)
    try:
        return admin_pb2_grpc.IdentityStub(ch).WhoAmI(admin_pb2.WhoAmIRequest())
    finally:
        ch.close()


def _enroll(server, secret: str):
    ch = open_channel(server.address, secret)
    try:
        return jobs_pb2_grpc.JobsStub(ch).Enroll(jobs_pb2.EnrollRequest(job_id=server.job))
    finally:
        ch.close()


def test_rotate_keeps_role_jobs_and_enrollments_and_refuses_the_old_secret(server):
    admin = admin_pb2_grpc.AdminStub(server.admin)
    created = admin.CreateToken(
        admin_pb2.CreateTokenRequest(name="alice", role="data-owner", jobs=[server.job], ttl_seconds=3600)
    )
    assert _enroll(server, created.secret).data_owner == "alice"
    r = _cli(server, "tokens", "rotate", created.token.id, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    new = out["token"]
    assert out["revoked"] == created.token.id and new["id"] != created.token.id
    assert (new["name"], new["role"], new["jobs"]) == ("alice", "data-owner", [server.job])
    # The old secret is refused at once; the new one is alice, still enrolled, with nothing to redo.
    with pytest.raises(grpc.RpcError) as e:
        _whoami(server, created.secret)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _whoami(server, out["secret"]).name == "alice"
    reg = server.server.state.registry
    assert reg.jobs_of_token(new["id"]) == [server.job] and reg.jobs_of_token(created.token.id) == []
    assert reg.enrolled_data_owners(server.job) == ["alice"]
    assert _enroll(server, out["secret"]).data_owner == "alice"
    # Expiry: the old token's lifetime by default, or --ttl.
    lifetime = reg.get_token(new["id"]).expires_at - reg.get_token(new["id"]).created_at
    assert 3590 <= lifetime.total_seconds() <= 3610
    r = _cli(server, "tokens", "rotate", new["id"], "--ttl", "60", "--json")
    assert r.exit_code == 0, r.output
    newer = reg.get_token(json.loads(r.stdout)["token"]["id"])
    assert 50 <= (newer.expires_at - newer.created_at).total_seconds() <= 70
    revoked = {
        t.id
        for t in admin.ListTokens(admin_pb2.ListTokensRequest(include_revoked=True)).tokens
        if t.HasField("revoked_at")
    }
    assert {created.token.id, new["id"]} <= revoked and newer.id not in revoked


def test_rotate_refuses_bad_input_with_a_clear_error(server):
    admin = admin_pb2_grpc.AdminStub(server.admin)
    before = len(admin.ListTokens(admin_pb2.ListTokensRequest(include_revoked=True)).tokens)
    r = _cli(server, "tokens", "rotate", "tok_nosuchtoken", "--json")
    assert r.exit_code != 0 and "NOT_FOUND" in json.loads(r.stdout)["error"] and "tok_nosuchtoken" in r.stdout
    partner = admin.CreateToken(admin_pb2.CreateTokenRequest(name="p", role="partner"))
    admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=partner.token.id))
    r = _cli(server, "tokens", "rotate", partner.token.id, "--json")
    assert r.exit_code != 0 and "revoked" in json.loads(r.stdout)["error"]
    # Only admins rotate, and not the token the call is made with.
    bob = admin.CreateToken(admin_pb2.CreateTokenRequest(name="bob", role="data-owner", jobs=[server.job]))
    r = _cli(server, "tokens", "rotate", bob.token.id, "--json", token=bob.secret)
    assert r.exit_code != 0
    own = _whoami(server, server.admin_token).token_id
    r = _cli(server, "tokens", "rotate", own, "--json")
    assert r.exit_code != 0 and "rotate-admin" in json.loads(r.stdout)["error"]
    r = _cli(server, "tokens", "rotate", bob.token.id, "--ttl", "-5", "--json")
    assert r.exit_code != 0 and "ttl_seconds" in json.loads(r.stdout)["error"]
    # Nothing was created by the refusals (bob and the partner are the only new rows).
    assert len(admin.ListTokens(admin_pb2.ListTokensRequest(include_revoked=True)).tokens) == before + 2
    assert _whoami(server, bob.secret).name == "bob"
