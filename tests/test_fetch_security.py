"""The client against a hostile or broken server (issue 10, item 6), each attack reproduced:
a digest that is a path, more bytes than announced, a compressed bomb, a truncated
archive, and a signing key received in the clear without a pin. Real gRPC servers on
loopback: the Offsite server, and a hostile one speaking the same protos."""

from __future__ import annotations

import importlib.util
import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from offsite.client.cli import app as client_app
from offsite.client.fetch import Enrollment, FetchError, download_artifact, enroll, fetch_bundle
from offsite.emulators.signing import generate_signing_key
from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
)
from offsite.server.app import ServerThread
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

_spec = importlib.util.spec_from_file_location("bundle_bombs", Path(__file__).with_name("test_bundle_bomb.py"))
bombs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bombs)
system_tmp = bombs.system_tmp  # fixture: an empty system temp dir and a 4 MiB cap on written files


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- a hostile server -------------------------------------------------------------------------


class Hostile(jobs_pb2_grpc.JobsServicer, artifacts_pb2_grpc.ArtifactsServicer):
    """Answers Enroll with `sha`/`size` and Download with `payload`, claiming `total`."""

    def __init__(self, pub: bytes) -> None:
        self.pub, self.sha, self.size, self.payload, self.total = pub, "0" * 64, 10, b"", None

    def Enroll(self, request, context):
        return jobs_pb2.EnrollResponse(
            job_id=request.job_id,
            data_owner="mallory",
            bundle_public_key=self.pub,
            bundle=common_pb2.ArtifactRef(sha256=self.sha, size=self.size),
        )

    def Download(self, request, context):
        total = len(self.payload) if self.total is None else self.total
        for i in range(request.offset, len(self.payload), 1 << 16):
            yield artifacts_pb2.DownloadChunk(
                offset=i, data=self.payload[i : i + (1 << 16)], total_size=total, sha256=request.sha256
            )


@pytest.fixture
def hostile(tmp_path):
    _, pub = generate_signing_key(tmp_path / "hostile-keys")
    servicer = Hostile(pub.read_bytes())
    server = grpc.server(futures.ThreadPoolExecutor(2))
    jobs_pb2_grpc.add_JobsServicer_to_server(servicer, server)
    artifacts_pb2_grpc.add_ArtifactsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def _enrollment(address: str, sha: str, size: int, pub: str) -> Enrollment:
    return Enrollment(
        server=address, job_id="job_1", data_owner="alice", bundle_sha256=sha, bundle_size=size, public_key_path=pub
    )


def test_a_digest_that_is_a_path_never_becomes_a_file(hostile, tmp_path):
    area = tmp_path / "area"
    home, cache = area / "home", area / "cache" / "bundles"
    hostile.sha = "../../x"
    hostile.payload = b"written outside the cache"
    with pytest.raises(FetchError, match="not a sha256"):
        enroll(hostile.address, "ofs_t", "job_1", home=home, insecure=True)
    assert not (home / "enrollments").exists()
    # An enrollment file edited to hold a path is refused too, before a path is made of it.
    with pytest.raises(FetchError, match="not a sha256"):
        fetch_bundle(_enrollment(hostile.address, "../../x", 25, str(tmp_path / "k.pub")), "ofs_t", cache_dir=cache)
    with pytest.raises(FetchError, match="not a sha256"):
        download_artifact(lambda: open_channel(hostile.address, "ofs_t"), "../../x", cache / "partial" / "p.part")
    assert [p for p in _files(area) if not p.startswith("home/keys/")] == []
    assert not (tmp_path / "x").exists() and not (area / "x.part").exists()


@pytest.mark.parametrize("claim", ["bigger-total", "more-than-total"])
def test_more_bytes_than_announced_are_refused(hostile, tmp_path, claim):
    announced = 100_000
    hostile.payload = bytes(announced + (1 << 20))
    hostile.total = len(hostile.payload) if claim == "bigger-total" else announced
    cache = tmp_path / "cache"
    e = _enrollment(hostile.address, "a" * 64, announced, str(tmp_path / "k.pub"))
    with pytest.raises(FetchError, match="streams|more bytes") as err:
        fetch_bundle(e, "ofs_t", cache_dir=cache)
    assert "refusing" in str(err.value)
    assert _files(cache) == []  # the partial file was removed, nothing larger than announced was kept


# --- the real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("data"), port=0, signing_key=tiny_bundle().signing_key)
    with ServerThread(config) as srv:
        srv.model = srv.server.state.registry.add_model("fetch-base", "tiny-llama")
        srv.admin = open_channel(srv.address, srv.admin_token)
        yield srv
        srv.admin.close()


def _job_serving(server, blob: Path, owner: str) -> tuple[str, str]:
    """A job whose emulator is `blob` as stored (bypassing RegisterEmulator, as a compromised
    server or store would), and a data-owner token for it."""
    state = server.server.state
    sha = state.store.put_file(blob)
    state.registry.add_artifact(sha, state.store.size(sha), "bundle", blob.name)
    emu = state.registry.add_emulator(server.model.id, sha, {}, {})
    job = jobs_pb2_grpc.JobsStub(server.admin).CreateJob(
        jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id))
    )
    token = (
        admin_pb2_grpc.AdminStub(server.admin)
        .CreateToken(admin_pb2.CreateTokenRequest(name=owner, role="data-owner", jobs=[job.id]))
        .secret
    )
    return job.id, token


def test_a_truncated_bundle_gives_a_clear_error_not_a_traceback(server, tmp_path, monkeypatch):
    data = tiny_bundle().tar_path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    job, token = _job_serving(server, cut, "trudy")
    pub = server.server.state.public_key
    e = enroll(server.address, token, job, home=tmp_path / "home", public_key=pub)
    with pytest.raises(FetchError, match="truncated"):
        fetch_bundle(e, token, cache_dir=tmp_path / "cache")
    assert [p for p in _files(tmp_path / "cache") if not p.startswith("partial/")] == []
    # The command line says the same in one line, --json or not.
    monkeypatch.setenv("OFFSITE_CLIENT_HOME", str(tmp_path / "home"))
    for args in (["--json"], []):
        result = CliRunner().invoke(client_app, ["fetch", "--job", job, "--cache", str(tmp_path / "cache2"), *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "truncated" in result.output and "Traceback" not in result.output
        if args:
            assert json.loads(result.stdout)["ok"] is False


def test_a_compressed_bomb_is_refused_before_it_is_unpacked(server, tmp_path, system_tmp):
    state = server.server.state
    resigned = bombs.make_bomb(tmp_path / "resigned.tar.gz", generate_signing_key(tmp_path / "k")[0], bombs.BIG)
    lying = bombs.make_bomb(tmp_path / "lying.tar.gz", state.signing_key, 1024)
    for blob, owner, why in ((resigned, "bob", "manifest.sig"), (lying, "eve", "the manifest says 1024")):
        job, token = _job_serving(server, blob, owner)
        e = enroll(server.address, token, job, home=tmp_path / "home", public_key=state.public_key)
        with pytest.raises(FetchError, match=why):
            fetch_bundle(e, token, cache_dir=tmp_path / "cache")  # a 256 MiB write would fail: EFBIG
        assert [p for p in _files(tmp_path / "cache") if not p.startswith("partial/")] == []
    assert list(system_tmp.iterdir()) == []


def test_without_tls_the_key_must_be_pinned_or_insecure_given(server, tmp_path, monkeypatch):
    state = server.server.state
    job, token = _job_serving(server, tiny_bundle().tar_path, "carol")
    home = tmp_path / "home"
    monkeypatch.delenv("OFFSITE_CA", raising=False)
    with pytest.raises(FetchError, match="without TLS.*--public-key.*--insecure"):
        enroll(server.address, token, job, home=home)
    assert not home.exists()  # nothing saved, not even the key
    # A server re-signing bundles with its own key is caught by the pin.
    other = generate_signing_key(tmp_path / "other")[1]
    with pytest.raises(FetchError, match="differs"):
        enroll(server.address, token, job, home=home, public_key=other)
    pinned = enroll(server.address, token, job, home=home, public_key=state.public_key)
    assert pinned.key_source == "pinned"
    assert fetch_bundle(pinned, token, cache_dir=tmp_path / "cache").manifest["format"] == "offsite-bundle/1"
    assert enroll(server.address, token, job, home=tmp_path / "h2", insecure=True).key_source == "insecure"
    # The command line: refused with the fix named, accepted with --insecure.
    monkeypatch.setenv("OFFSITE_CLIENT_HOME", str(tmp_path / "h3"))
    base = ["enroll", "--server", server.address, "--token", token, "--job", job, "--json"]
    refused = CliRunner().invoke(client_app, base)
    assert refused.exit_code == 1 and "--insecure" in json.loads(refused.stdout)["error"]
    accepted = CliRunner().invoke(client_app, [*base, "--insecure"])
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["enrollment"]["key_source"] == "insecure"
