"""The Prometheus endpoint and the JSON log lines of a real server.

RPCs by method and code with latency histograms (refused calls included), bytes served by
Download, and the registry's operations, jobs, rounds, releases and eval verdicts, scraped
over HTTP and parsed with prometheus-client's own parser; every access-log line carries the
RPC's request id (the caller's x-request-id when given), as JSON with --log-format json.
"""

from __future__ import annotations

import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from offsite.protos.channel import open_channel
from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, models_pb2, models_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.logs import JsonFormatter, RequestIdFilter, configure
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = tiny_bundle()
    cfg = ServerConfig(
        data_dir=tmp_path_factory.mktemp("srv"),
        port=0,
        signing_key=bundle.signing_key,
        extra={"metrics_address": "127.0.0.1:0"},
    )
    s = ServerThread(cfg).start()
    yield s, bundle
    s.stop()


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_rpcs_bytes_and_registry_state_are_exported(server):
    s, bundle = server
    admin = open_channel(s.address, s.admin_token)
    models_pb2_grpc.ModelsStub(admin).RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    stranger = open_channel(s.address, "ofs_not_a_real_token")
    with pytest.raises(grpc.RpcError) as e:
        models_pb2_grpc.ModelsStub(stranger).ListModels(models_pb2.ListModelsRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    arts = artifacts_pb2_grpc.ArtifactsStub(admin)
    data = bundle.tar_path.read_bytes()
    ref = arts.Upload(
        iter([artifacts_pb2.UploadRequest(kind="bundle", name="b.tar"), artifacts_pb2.UploadRequest(data=data)])
    )
    got = b"".join(c.data for c in arts.Download(artifacts_pb2.DownloadRequest(sha256=ref.sha256)))
    assert got == data

    m = _scrape(s.server.metrics_port)
    rpc = "offsite_rpc_total"
    assert m[(rpc, (("code", "OK"), ("method", "/offsite.v1.Models/RegisterModel")))] == 1
    assert m[(rpc, (("code", "UNAUTHENTICATED"), ("method", "/offsite.v1.Models/ListModels")))] == 1
    assert m[(rpc, (("code", "OK"), ("method", "/offsite.v1.Artifacts/Upload")))] == 1
    assert m[("offsite_rpc_seconds_count", (("method", "/offsite.v1.Artifacts/Download"),))] == 1
    assert m[("offsite_rpc_seconds_bucket", (("le", "+Inf"), ("method", "/offsite.v1.Models/RegisterModel")))] == 1
    assert m[("offsite_artifact_bytes_served_total", ())] == len(data)
    # From the registry: the server's own state, whatever process wrote it.
    assert ("offsite_rounds_total", ()) in m
    reg = s.server.state.registry
    reg.add_job("j", "mdl_x", "", {"rounds": 1})
    op = reg.add_operation("emulator-build")
    reg.update_operation(op.id, state="succeeded")
    reg.add_eval_report("cand", "base", "pass", [])
    m = _scrape(s.server.metrics_port)
    assert m[("offsite_jobs", (("state", "created"),))] == 1
    assert m[("offsite_operations", (("kind", "emulator-build"), ("state", "succeeded")))] == 1
    assert m[("offsite_eval_reports_total", (("verdict", "pass"),))] == 1


def test_access_log_lines_carry_the_request_id_as_json(server):
    s, _ = server
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Capture()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("offsite.server.metrics")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        admin = open_channel(s.address, s.admin_token)
        stub = models_pb2_grpc.ModelsStub(admin)
        stub.ListModels(models_pb2.ListModelsRequest(), metadata=[("x-request-id", "req-from-caller-1")])
        stub.ListModels(models_pb2.ListModelsRequest())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = [json.loads(r) for r in records if "ListModels" in r]
    assert len(lines) == 2 and all(line["level"] == "DEBUG" and "time" in line for line in lines)
    assert lines[0]["request_id"] == "req-from-caller-1"
    assert len(lines[1]["request_id"]) == 16 and lines[1]["request_id"] != lines[0]["request_id"]


def test_log_format_is_checked():
    with pytest.raises(ValueError, match="--log-format 'xml'"):
        configure("xml")


def test_serve_flags_metrics_address_and_json_logs(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        mport = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "offsite-admin"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--data-dir",
            str(tmp_path / "srv"),
            "--port",
            "0",
            "--metrics-address",
            f"127.0.0.1:{mport}",
            "--log-format",
            "json",
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read()
        address = line.split("listening on ")[1].split()[0]
        token = (tmp_path / "srv" / "admin.token").read_text().strip()
        models_pb2_grpc.ModelsStub(open_channel(address, token)).ListModels(models_pb2.ListModelsRequest())
        m = _scrape(mport)
        assert m[("offsite_rpc_total", (("code", "OK"), ("method", "/offsite.v1.Models/ListModels")))] == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    json_lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert json_lines and all({"time", "level", "logger", "message"} <= set(x) for x in json_lines)
    bad = subprocess.run(
        [str(exe), "serve", "--data-dir", str(tmp_path / "b"), "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = " ".join(bad.stderr.split())  # rich wraps long lines
    assert bad.returncode == 2 and "--log-format 'xml'" in said and not (tmp_path / "b").exists()
