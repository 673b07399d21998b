"""`kill -9` of a real `offsite-admin serve` process while it works, then a restart.

After each kill: nothing the server acknowledged is lost, no half-written artifact is
served (every blob under its final name hashes to its name), the registry passes SQLite's
integrity check, and an operation that was running is marked failed with a reason.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    artifacts_pb2,
    artifacts_pb2_grpc,
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
from offsite.server.artifacts import ArtifactStore
from offsite.server.testing import ServerProcess, tiny_bundle

REPO = Path(__file__).resolve().parents[2]
FAILED = operations_pb2.OPERATION_STATE_FAILED
RUNNING = operations_pb2.OPERATION_STATE_RUNNING


def _server(tmp_path: Path, *args: str) -> ServerProcess:
    # PYTHONPATH: the server process imports the slow test hooks from tests/reliability.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    return ServerProcess(tmp_path / "srv", extra_args=list(args), env=env)


def assert_store_whole(data_dir: Path) -> int:
    """Every blob under its final name is whole (a crash leaves at most temp files)."""
    store = ArtifactStore(data_dir / "artifacts")
    blobs = [p for p in store.blobs.rglob("*") if p.is_file()]
    assert all(store.verify(p.name) for p in blobs), "a blob does not hash to its name"
    return len(blobs)


def assert_registry_intact(data_dir: Path) -> None:
    with sqlite3.connect(data_dir / "registry.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _wait_state(ops, op_id: str, state: int, timeout: float = 120.0) -> operations_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = ops.GetOperation(operations_pb2.GetOperationRequest(id=op_id))
        if op.state == state:
            return op
        assert not op.done, f"operation ended as {op.state} ({op.error}) before the kill"
        time.sleep(0.1)
    raise AssertionError(f"operation {op_id} never reached state {state}")


def test_kill_during_an_upload_serves_no_half_artifact(tmp_path):
    srv = _server(tmp_path).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        arts = artifacts_pb2_grpc.ArtifactsStub(admin)
        before = arts.Upload(iter([artifacts_pb2.UploadRequest(kind="blob", data=b"acknowledged " * 4096)]))
        blob = os.urandom(48 << 20)
        sent = []

        def chunks():
            yield artifacts_pb2.UploadRequest(kind="blob", name="big.bin")
            for i in range(0, len(blob), 1 << 20):
                if i == 16 << 20:
                    srv.kill()  # a third of the bytes are in: the server dies mid-stream
                sent.append(i)
                yield artifacts_pb2.UploadRequest(data=blob[i : i + (1 << 20)])

        with pytest.raises(grpc.RpcError) as e:
            arts.Upload(chunks())
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
        admin.close()
        assert_store_whole(srv.data_dir)
        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        arts = artifacts_pb2_grpc.ArtifactsStub(admin)
        want = hashlib.sha256(blob).hexdigest()
        with pytest.raises(grpc.RpcError) as e:  # the half upload is not an artifact
            arts.StatArtifact(artifacts_pb2.StatArtifactRequest(sha256=want))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        got = b"".join(c.data for c in arts.Download(artifacts_pb2.DownloadRequest(sha256=before.sha256)))
        assert hashlib.sha256(got).hexdigest() == before.sha256  # the acknowledged one is intact
        # The same upload, sent again, completes.
        again = arts.Upload(
            iter(
                [
                    artifacts_pb2.UploadRequest(kind="blob", data=blob[i : i + (4 << 20)])
                    for i in range(0, len(blob), 4 << 20)
                ]
            )
        )
        assert again.sha256 == want and again.size == len(blob)
    finally:
        srv.kill()
    assert_store_whole(srv.data_dir)
    assert_registry_intact(srv.data_dir)


def test_kill_during_a_registry_write_burst_loses_no_acknowledged_write(tmp_path):
    srv = _server(tmp_path).start()
    acknowledged: dict[str, str] = {}  # token id -> secret, for every CreateToken that answered
    lock = threading.Lock()
    try:
        token = srv.admin_token

        def writer(n: int) -> None:
            stub = admin_pb2_grpc.AdminStub(open_channel(srv.address, token))
            for i in range(10_000):
                try:
                    r = stub.CreateToken(admin_pb2.CreateTokenRequest(name=f"w{n}-{i}", role="partner"), timeout=10)
                except grpc.RpcError:
                    return  # the server died
                with lock:
                    acknowledged[r.token.id] = r.secret

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        while len(acknowledged) < 60:
            time.sleep(0.02)
        srv.kill()
        for t in threads:
            t.join(30)
        assert_registry_intact(srv.data_dir)
        srv.start()
        admin = open_channel(srv.address, token)
        listed = {t.id for t in admin_pb2_grpc.AdminStub(admin).ListTokens(admin_pb2.ListTokensRequest()).tokens}
        lost = set(acknowledged) - listed
        assert not lost, f"{len(lost)} acknowledged tokens lost of {len(acknowledged)}"
        for secret in list(acknowledged.values())[::15]:  # and they still authenticate
            who = admin_pb2_grpc.IdentityStub(open_channel(srv.address, secret)).WhoAmI(admin_pb2.WhoAmIRequest())
            assert who.role == "partner"
    finally:
        srv.kill()


def test_kill_during_an_emulator_build_marks_it_failed_and_a_rebuild_works(tmp_path):
    bundle = tiny_bundle()
    srv = _server(tmp_path, "--signing-key", str(bundle.signing_key)).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        emus = models_pb2_grpc.EmulatorsStub(admin)
        op = emus.BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny"))
        _wait_state(operations_pb2_grpc.OperationsStub(admin), op.id, RUNNING)
        srv.kill()
        admin.close()
        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        ops = operations_pb2_grpc.OperationsStub(admin)
        stale = ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        if stale.state == FAILED:  # it may have finished between the RUNNING read and the kill
            assert "server stopped" in stale.error
            emus = models_pb2_grpc.EmulatorsStub(admin)
            assert not emus.ListEmulators(models_pb2.ListEmulatorsRequest()).emulators  # no half emulator
        leftovers = [p.name for p in (srv.data_dir / "work").iterdir() if op.id in p.name]
        assert not leftovers, f"scratch directories of the killed build were left: {leftovers}"
        again = models_pb2_grpc.EmulatorsStub(admin).BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny"))
        done = _wait_done(ops, again.id)
        assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
    finally:
        srv.kill()
    assert_store_whole(srv.data_dir)
    assert_registry_intact(srv.data_dir)


def _wait_done(ops, op_id: str, timeout: float = 300.0) -> operations_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = ops.GetOperation(operations_pb2.GetOperationRequest(id=op_id))
        if op.done:
            return op
        time.sleep(0.2)
    raise AssertionError(f"operation {op_id} did not finish in {timeout} s")


def test_kill_during_an_eval_run_marks_it_failed_with_no_report(tmp_path):
    srv = _server(tmp_path, "--eval-runner", "tests.reliability.slow_hooks:slow_eval").start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        evals = evals_pb2_grpc.EvalsStub(admin)
        op = evals.RunEval(evals_pb2.RunEvalRequest(candidate="tiny", limit=1))
        ops = operations_pb2_grpc.OperationsStub(admin)
        _wait_state(ops, op.id, RUNNING)
        deadline = time.monotonic() + 60  # the hook has started writing its report
        while not list((srv.data_dir / "work").glob(f"eval-{op.id}-*/report/partial.txt")):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        srv.kill()
        admin.close()
        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        stale = operations_pb2_grpc.OperationsStub(admin).GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        assert stale.state == FAILED and "server stopped" in stale.error
        reports = evals_pb2_grpc.EvalsStub(admin).ListEvalReports(evals_pb2.ListEvalReportsRequest())
        assert not reports.reports  # no verdict from a run that never finished
        leftovers = [p.name for p in (srv.data_dir / "work").iterdir() if op.id in p.name]
        assert not leftovers, f"scratch directories of the killed eval were left: {leftovers}"
    finally:
        srv.kill()
    assert_registry_intact(srv.data_dir)


def _wait_job(jobs, job_id: str, pred, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.GetJob(jobs_pb2.GetJobRequest(id=job_id))
        if pred(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {job}")


def test_kill_during_a_round_and_after_the_release_never_makes_a_second_candidate(tmp_path):
    bundle = tiny_bundle()
    srv = _server(
        tmp_path, "--signing-key", str(bundle.signing_key), "--job-runner", "tests.reliability.slow_hooks:rounds_runner"
    )
    srv.env["RELIABILITY_PAUSE"] = "round-2"
    srv.start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(
            iter(
                [artifacts_pb2.UploadRequest(kind="bundle")]
                + [artifacts_pb2.UploadRequest(data=bundle.tar_path.read_bytes())]
            )
        )
        emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
        )
        jobs = jobs_pb2_grpc.JobsStub(admin)
        job = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id, rounds=3)))
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        _wait_job(jobs, job.id, lambda j: j.current_round == 1)
        time.sleep(0.3)  # inside round 2
        srv.kill()  # 1: mid-round
        srv.env["RELIABILITY_PAUSE"] = "after-release"
        srv.start()
        jobs = jobs_pb2_grpc.JobsStub(open_channel(srv.address, srv.admin_token))
        stale = jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id))
        assert stale.state == jobs_pb2.JOB_STATE_FAILED and "server stopped" in stale.error
        assert [r.number for r in jobs.ListRounds(jobs_pb2.ListRoundsRequest(job_id=job.id)).rounds] == [1]
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))  # resumes at round 2
        _wait_job(jobs, job.id, lambda j: j.release_id != "")
        srv.kill()  # 2: the candidate exists, the job was not yet marked completed
        srv.env["RELIABILITY_PAUSE"] = ""
        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        jobs = jobs_pb2_grpc.JobsStub(admin)
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        done = _wait_job(jobs, job.id, lambda j: j.state in (jobs_pb2.JOB_STATE_COMPLETED, jobs_pb2.JOB_STATE_FAILED))
        assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done.error
        assert [r.number for r in jobs.ListRounds(jobs_pb2.ListRoundsRequest(job_id=job.id)).rounds] == [1, 2, 3]
        releases = releases_pb2_grpc.ReleasesStub(admin).ListReleases(releases_pb2.ListReleasesRequest(job_id=job.id))
        assert len(releases.releases) == 1, "a restart made a second candidate"
        assert done.release_id == releases.releases[0].id
    finally:
        srv.kill()
    assert_store_whole(srv.data_dir)
    assert_registry_intact(srv.data_dir)
