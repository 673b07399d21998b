"""The model owner's path through the API on a real server, with real clients:
build (an operation) -> job -> data-owner enroll + fetch -> rounds -> release -> gate -> export.

The job runner and eval runner are the server's hooks; here they are small stand-ins for
the federation and safety teams' runners (their own tests run the real ones), so this test
checks the plumbing: operations, events, gate transitions, approvals.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from offsite.client.fetch import FetchError, enroll, fetch_bundle
from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    evals_pb2,
    evals_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    releases_pb2,
    releases_pb2_grpc,
)
from offsite.server.app import ServerThread
from offsite.server.hooks import JobRunContext
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

pytestmark = pytest.mark.e2e

GATE = {"verdict": "block"}
CANCEL_SEEN = threading.Event()


def fake_eval_runner(candidate, base, suites, limit, out_dir, progress=True, policy_path=None):
    assert Path(candidate).is_dir() and (Path(candidate) / "config.json").is_file()  # the plugged-in release
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "run": {"complete": not limit},
        "categories": [{"name": "disallowed_content", "level": "Low" if GATE["verdict"] == "pass" else "High"}],
        "gate": {
            "verdict": GATE["verdict"],
            "blocked_categories": [] if GATE["verdict"] == "pass" else ["disallowed_content"],
        },
    }
    (out_dir / "report.json").write_text(json.dumps(report))
    (out_dir / "report.html").write_text("<html><body>scorecard</body></html>")
    return report


def fake_job_runner(ctx: JobRunContext) -> None:
    if ctx.job.name.startswith("hang"):
        while True:  # a long round: only cancellation ends it
            try:
                ctx.progress(0.5, "waiting for clients")
            except Exception:
                CANCEL_SEEN.set()
                raise
            time.sleep(0.05)
    with tarfile.open(ctx.bundle_path) as tf:
        tf.extract("adapter.safetensors", ctx.work_dir, filter="data")
    adapter = ctx.work_dir / "adapter.safetensors"
    rounds = ctx.job.spec["rounds"]
    for n in range(1, rounds + 1):
        ctx.progress(n / (rounds + 1), f"round {n}")
        ctx.record_round(n, {"clients": len(ctx.data_owners), "plugin_ppl": 100.0 - n}, adapter)
    ctx.create_release(adapter, {"plugin_ppl": 100.0 - rounds})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServerConfig(
        data_dir=tmp_path_factory.mktemp("srv"),
        port=0,
        job_runner=fake_job_runner,
        eval_runner=fake_eval_runner,
        signing_key=tiny_bundle().signing_key,
    )
    s = ServerThread(cfg).start()
    yield s
    s.stop()


def _wait_op(channel, op):
    last = op
    states = []
    for last in operations_pb2_grpc.OperationsStub(channel).WatchOperation(
        operations_pb2.WatchOperationRequest(id=op.id)
    ):
        states.append((last.state, last.progress))
    return last, states


def test_full_path(server, tmp_path):
    admin = open_channel(server.address, server.admin_token)
    models = models_pb2_grpc.ModelsStub(admin)
    model = models.RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    assert model.family == "llama" and model.num_layers == 8 and len(model.digest) == 64

    # Emulator build is an operation: watched to the end with rising progress.
    emus = models_pb2_grpc.EmulatorsStub(admin)
    op = emus.BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny"))
    assert op.kind == "emulator-build" and not op.done
    done, states = _wait_op(admin, op)
    assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
    progresses = [p for _, p in states]
    assert progresses == sorted(progresses) and progresses[-1] == 1.0 and len(states) >= 3
    emu_id = done.resource.split("/", 1)[1]
    emu = emus.GetEmulator(models_pb2.GetEmulatorRequest(id=emu_id))
    assert emu.bundle.size > 0 and emu.manifest["base_model"]["digest"] == model.digest

    jobs = jobs_pb2_grpc.JobsStub(admin)
    from offsite.server.convert import struct

    job = jobs.CreateJob(
        jobs_pb2.CreateJobRequest(
            name="py",
            spec=jobs_pb2.JobSpec(
                emulator_id=emu_id, rounds=2, min_clients=1, train_config=struct({"steps": 20, "lr": 1e-4})
            ),
        )
    )
    assert job.state == jobs_pb2.JOB_STATE_CREATED
    # Runners get Python ints back for whole numbers (a Struct stores doubles).
    assert server.server.state.registry.get_job(job.id).spec["train_config"] == {"steps": 20, "lr": 1e-4}
    tok = admin_pb2_grpc.AdminStub(admin).CreateToken(
        admin_pb2.CreateTokenRequest(name="alice", role="data-owner", jobs=[job.id])
    )

    # The data owner enrolls and fetches; the second fetch downloads nothing.
    home, cache = tmp_path / "home", tmp_path / "cache"
    enrollment = enroll(server.address, tok.secret, job.id, home=home, public_key=server.server.state.public_key)
    assert enrollment.bundle_sha256 == emu.bundle.sha256 and Path(enrollment.public_key_path).is_file()
    assert enrollment.train_config == {"steps": 20, "lr": 1e-4} and isinstance(enrollment.train_config["steps"], int)
    first = fetch_bundle(enrollment, tok.secret, cache_dir=cache)
    assert not first.cached and first.downloaded == emu.bundle.size
    assert (first.path / "manifest.json").is_file()
    second = fetch_bundle(enrollment, tok.secret, cache_dir=cache)
    assert second.cached and second.downloaded == 0 and second.path == first.path

    # The job runner hook runs the rounds; the watch stream carries them and the release.
    start = jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
    events = list(jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job.id, follow=True)))
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["created", "enrolled"] and kinds.count("round") == 2 and "release" in kinds
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == "state" and events[-1].data["to"] == "completed"
    op_done, _ = _wait_op(admin, start)
    assert op_done.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    job = jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert job.state == jobs_pb2.JOB_STATE_COMPLETED and job.current_round == 2 and list(job.data_owners) == ["alice"]
    rounds = jobs.ListRounds(jobs_pb2.ListRoundsRequest(job_id=job.id)).rounds
    assert [r.number for r in rounds] == [1, 2] and rounds[1].metrics["plugin_ppl"] == 98.0
    assert rounds[1].adapter.kind == "adapter"

    # Release: the gate blocks, then passes; only then can an admin approve without override.
    releases = releases_pb2_grpc.ReleasesStub(admin)
    rel = releases.GetRelease(releases_pb2.GetReleaseRequest(id=job.release_id))
    assert rel.status == "pending-gate" and rel.adapter.size > 0
    evals = evals_pb2_grpc.EvalsStub(admin)
    GATE["verdict"] = "block"
    done, _ = _wait_op(admin, evals.RunEval(evals_pb2.RunEvalRequest(candidate=rel.id, limit=5)))
    assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
    assert releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id)).status == "blocked"
    with pytest.raises(grpc.RpcError) as e:
        releases.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    GATE["verdict"] = "pass"
    done, _ = _wait_op(admin, evals.RunEval(evals_pb2.RunEvalRequest(candidate=rel.id)))
    report = evals.GetEvalReport(evals_pb2.GetEvalReportRequest(id=done.resource.split("/", 1)[1]))
    assert report.verdict == "pass" and report.release_id == rel.id and report.report_html.size > 0
    assert [c.level for c in report.categories] == ["Low"]
    rel = releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id))
    assert rel.status == "pending-gate" and rel.gate_verdict == "pass" and rel.gate_report_id == report.id
    approved = releases.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id))
    assert approved.status == "approved" and "after an earlier block" in approved.reason

    # Export: the adapter plugged into the base model, stored as a tar of an HF directory.
    done, _ = _wait_op(admin, releases.ExportRelease(releases_pb2.ExportReleaseRequest(id=rel.id)))
    assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
    rel = releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id))
    assert rel.status == "released" and rel.export.size > 0
    export_tar = server.server.state.store.path(rel.export.sha256)
    with tarfile.open(export_tar) as tf:
        assert "config.json" in tf.getnames()
    with pytest.raises(grpc.RpcError) as e:
        releases.RejectRelease(releases_pb2.RejectReleaseRequest(id=rel.id))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in e.value.details()


def test_eval_schedules(server):
    admin = open_channel(server.address, server.admin_token)
    models_pb2_grpc.ModelsStub(admin).RegisterModel(
        models_pb2.RegisterModelRequest(name="sched-base", source="tiny-gpt2")
    )
    evals = evals_pb2_grpc.EvalsStub(admin)
    with pytest.raises(grpc.RpcError) as e:
        evals.CreateEvalSchedule(evals_pb2.CreateEvalScheduleRequest(cron="every day", candidate="sched-base"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cron" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        evals.RunEval(evals_pb2.RunEvalRequest(candidate="sched-base", suites=["../../etc/passwd"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "suite" in e.value.details()
    s = evals.CreateEvalSchedule(
        evals_pb2.CreateEvalScheduleRequest(cron="0 3 * * *", candidate="sched-base", limit=10)
    )
    assert s.enabled and s.next_run_at.seconds > time.time()
    assert s.id in [x.id for x in evals.ListEvalSchedules(evals_pb2.ListEvalSchedulesRequest()).schedules]
    due = server.server.state.registry.due_eval_schedules()
    assert s.id not in [d.id for d in due]
    evals.DeleteEvalSchedule(evals_pb2.DeleteEvalScheduleRequest(id=s.id))
    assert s.id not in [x.id for x in evals.ListEvalSchedules(evals_pb2.ListEvalSchedulesRequest()).schedules]


def test_cancel_a_running_job(server):
    admin = open_channel(server.address, server.admin_token)
    reg = server.server.state.registry
    model = reg.add_model("hang-model", "tiny-opt")
    emu = reg.add_emulator(model.id, "0" * 64, {}, {})  # the hanging runner never opens the bundle
    jobs = jobs_pb2_grpc.JobsStub(admin)

    job = jobs.CreateJob(jobs_pb2.CreateJobRequest(name="hang-1", spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    op = jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
    ops = operations_pb2_grpc.OperationsStub(admin)
    for _ in range(100):
        if (
            ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id)).state
            == operations_pb2.OPERATION_STATE_RUNNING
        ):
            break
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as e:
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED and CANCEL_SEEN.is_set()
    assert (
        ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id)).state == operations_pb2.OPERATION_STATE_CANCELLED
    )


def test_tampered_bundles_are_refused(server, tmp_path):
    """Changed bytes fail the digest; a re-packed bundle with a changed file fails the signature."""
    state = server.server.state
    admin = open_channel(server.address, server.admin_token)
    model = state.registry.add_model("tamper-base", "tiny-llama")
    sha = state.store.put_file(tiny_bundle().tar_path)
    state.registry.add_artifact(sha, state.store.size(sha), "bundle", "tiny.tar")
    emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
        models_pb2.RegisterEmulatorRequest(model=model.id, bundle_sha256=sha)
    )
    good_tar = state.store.path(emu.bundle.sha256)

    # 1. A re-packed bundle whose config.json was edited (a compromised store or server).
    unpacked = tmp_path / "unpacked"
    with tarfile.open(good_tar) as tf:
        tf.extractall(unpacked, filter="data")
    cfg = json.loads((unpacked / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (unpacked / "config.json").write_text(json.dumps(cfg))
    evil_sha = state.store.put_dir_as_tar(unpacked)
    state.registry.add_artifact(evil_sha, state.store.size(evil_sha), "bundle", "evil.tar")
    # The server itself refuses to register it ...
    with pytest.raises(grpc.RpcError) as e:
        models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model=emu.model_id, bundle_sha256=evil_sha)
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.json" in e.value.details()
    # ... and a client handed it anyway refuses it, naming the file.
    evil_emu = state.registry.add_emulator(emu.model_id, evil_sha, {}, {})
    jobs = jobs_pb2_grpc.JobsStub(admin)
    job = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=evil_emu.id)))
    tok = (
        admin_pb2_grpc.AdminStub(admin)
        .CreateToken(admin_pb2.CreateTokenRequest(name="carol", role="data-owner", jobs=[job.id]))
        .secret
    )
    enrollment = enroll(server.address, tok, job.id, home=tmp_path / "home", public_key=state.public_key)
    with pytest.raises(FetchError, match="config.json"):
        fetch_bundle(enrollment, tok, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / evil_sha).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != "partial"] == []

    # 2. Bytes changed on the server's disk after they were stored: the digest check refuses them.
    job2 = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    tok2 = (
        admin_pb2_grpc.AdminStub(admin)
        .CreateToken(admin_pb2.CreateTokenRequest(name="dave", role="data-owner", jobs=[job2.id]))
        .secret
    )
    enrollment2 = enroll(server.address, tok2, job2.id, home=tmp_path / "home2", public_key=state.public_key)
    backup = tmp_path / "backup.tar"
    shutil.copyfile(good_tar, backup)
    good_tar.chmod(0o644)
    data = bytearray(good_tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    good_tar.write_bytes(bytes(data))
    try:
        with pytest.raises(FetchError, match="sha256"):
            fetch_bundle(enrollment2, tok2, cache_dir=tmp_path / "cache2")
        assert not (tmp_path / "cache2" / "partial" / f"{emu.bundle.sha256}.part").exists()
    finally:
        shutil.copyfile(backup, good_tar)
        good_tar.chmod(0o444)
