"""A release's gate run receives the previous release's report, so its report shows what changed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    evals_pb2,
    evals_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
)
from offsite.server.app import ServerThread
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

pytestmark = pytest.mark.e2e

SEEN: list[dict | None] = []  # the previous_report each run was given, in order


def recording_runner(candidate, base, suites, limit, out_dir, progress=True, policy_path=None, previous_report=None):
    SEEN.append(previous_report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "run": {"complete": True},
        "candidate": str(candidate),
        "run_number": len(SEEN),
        "categories": [{"name": "capability", "level": "Low"}],
        "gate": {"verdict": "pass", "policy": "default", "deployable_level": "Medium"},
    }
    (out_dir / "report.json").write_text(json.dumps(report))
    return report


def fake_exporter(base_source, adapter_path, out_dir):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.json").write_text("{}")


def _run(admin, candidate):
    op = evals_pb2_grpc.EvalsStub(admin).RunEval(evals_pb2.RunEvalRequest(candidate=candidate))
    ops = operations_pb2_grpc.OperationsStub(admin)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        if done.done:
            assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
            return done
        time.sleep(0.1)
    raise AssertionError("the eval run did not finish in 60 s")


def test_second_release_is_diffed_against_the_first(tmp_path):
    bundle = tiny_bundle()
    cfg = ServerConfig(
        data_dir=tmp_path / "srv",
        port=0,
        signing_key=bundle.signing_key,
        eval_runner=recording_runner,
        release_exporter=fake_exporter,
        background_tasks=[],
    )
    server = ServerThread(cfg).start()
    try:
        admin = open_channel(server.address, server.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(
            iter([artifacts_pb2.UploadRequest(kind="bundle", name="b.tar", data=bundle.tar_path.read_bytes())])
        )
        emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
        )
        reg, store = server.server.state.registry, server.server.state.store
        job = reg.add_job("j", emu.model_id, emu.id, {"rounds": 1})
        first = reg.create_release(job.id, emu.model_id, store.put_bytes(b"adapter one"))
        second = reg.create_release(job.id, emu.model_id, store.put_bytes(b"adapter two"))
        SEEN.clear()
        _run(admin, first.id)
        _run(admin, second.id)
        assert SEEN[0] is None  # the first release has nothing to compare with
        assert SEEN[1] is not None and SEEN[1]["run_number"] == 1  # the second sees the first's report
    finally:
        server.stop()
