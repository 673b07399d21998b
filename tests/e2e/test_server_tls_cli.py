"""TLS and mutual TLS with certificates from `offsite-admin keys init --tls`, and the
`offsite-admin` / `offsite-client` command lines against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import admin_pb2, admin_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

pytestmark = pytest.mark.e2e


def _cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def admin_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return _cli("offsite.server.cli.main", *args, env=env)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    out = admin_cli("keys", "init", "--dir", str(d), "--tls", "--json")
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)
    assert oct(os.stat(paths["server_key"]).st_mode & 0o777) == "0o600"
    return paths


def test_mutual_tls(pki, tmp_path):
    cfg = ServerConfig(
        data_dir=tmp_path / "srv",
        port=0,
        tls_cert=pki["server_pem"],
        tls_key=pki["server_key"],
        client_ca=pki["ca_pem"],
    )
    with ServerThread(cfg) as server:
        address = f"localhost:{server.port}"
        token = server.admin_token
        ok = open_channel(address, token, ca=pki["ca_pem"], client_cert=pki["client_pem"], client_key=pki["client_key"])
        assert admin_pb2_grpc.IdentityStub(ok).WhoAmI(admin_pb2.WhoAmIRequest(), timeout=10).role == "admin"
        for channel in (
            open_channel(address, token, ca=pki["ca_pem"]),  # no client certificate
            open_channel(address, token),
        ):  # no TLS at all
            with pytest.raises(grpc.RpcError) as e:
                admin_pb2_grpc.IdentityStub(channel).WhoAmI(admin_pb2.WhoAmIRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_admin_and_client_cli(pki, tmp_path):
    bundle = tiny_bundle()
    cfg = ServerConfig(
        data_dir=tmp_path / "srv",
        port=0,
        tls_cert=pki["server_pem"],
        tls_key=pki["server_key"],
        signing_key=bundle.signing_key,
        job_runner="offsite.server.no_such_runner:run_job",
    )
    with ServerThread(cfg) as server:
        env = {
            "OFFSITE_SERVER": f"localhost:{server.port}",
            "OFFSITE_TOKEN": server.admin_token,
            "OFFSITE_CA": pki["ca_pem"],
            "OFFSITE_CLIENT_HOME": str(tmp_path / "home"),
            "OFFSITE_CACHE": str(tmp_path / "cache"),
        }
        r = admin_cli("models", "register", "tiny", "--source", "tiny-llama", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["family"] == "llama"
        r = admin_cli("models", "list", "--json", env=env)
        assert [m["name"] for m in json.loads(r.stdout)] == ["tiny"]
        r = admin_cli("bundles", "upload", str(bundle.tar_path), "--model", "tiny", "--json", env=env)
        assert r.returncode == 0, r.stderr
        emu = json.loads(r.stdout)
        r = admin_cli(
            "jobs",
            "create",
            "--emulator",
            emu["id"],
            "--rounds",
            "2",
            "--train-config",
            '{"steps": 3}',
            "--json",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert job["spec"]["train_config"] == {"steps": 3.0}  # JSON of a Struct: numbers are doubles
        r = admin_cli(
            "tokens", "create", "--role", "data-owner", "--name", "alice", "--job", job["id"], "--json", env=env
        )
        secret = json.loads(r.stdout)["secret"]
        # A partner may not list tokens: a clear error and a non-zero exit.
        partner = json.loads(
            admin_cli("tokens", "create", "--role", "partner", "--name", "p", "--json", env=env).stdout
        )
        r = admin_cli("tokens", "list", env={**env, "OFFSITE_TOKEN": partner["secret"]})
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
        r = admin_cli("--token", "", "models", "list", env={**env, "OFFSITE_TOKEN": ""})
        assert r.returncode == 2 and "no token" in r.stderr

        client_env = {**env, "OFFSITE_TOKEN": ""}
        r = _cli(
            "offsite.client.cli",
            "enroll",
            "--server",
            env["OFFSITE_SERVER"],
            "--token",
            secret,
            "--job",
            job["id"],
            "--ca",
            pki["ca_pem"],
            "--fetch",
            "--json",
            env=client_env,
        )
        assert r.returncode == 0, r.stderr
        first = json.loads(r.stdout)
        assert first["ok"] and not first["cached"] and first["downloaded"] == int(emu["bundle"]["size"])
        r = _cli("offsite.client.cli", "fetch", "--job", job["id"], "--json", env=client_env)
        second = json.loads(r.stdout)
        assert second["cached"] and second["downloaded"] == 0 and second["bundle"] == first["bundle"]

        r = admin_cli("jobs", "get", job["id"], "--json", env=env)
        assert json.loads(r.stdout)["data_owners"] == ["alice"]
        r = admin_cli("audit", "--method", "Enroll", "--json", env=env)
        assert [a["actor"] for a in json.loads(r.stdout)] == ["alice"]
        r = admin_cli("jobs", "start", job["id"], env=env)  # this server's job runner is not installed
        assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "no_such_runner" in r.stderr
