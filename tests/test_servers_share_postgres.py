"""Two `offsite-admin serve` processes sharing one PostgreSQL registry and one data directory.

A job started through one is visible through the other, can be cancelled through the
other (the running server notices and stops its work), and resumes on the other after its
last round; a start racing on both runs it once; a third server starting beside them does
not fail the job the first one runs. The job runner is tests/helpers/shared_job_runner.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc, operations_pb2, operations_pb2_grpc
from offsite.server.postgres import PostgresUnavailable, server_for_tests

pytestmark = [pytest.mark.e2e]
TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pg():
    try:
        server = server_for_tests()
    except PostgresUnavailable as e:
        if os.environ.get("OFFSITE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (OFFSITE_REQUIRE_POSTGRES=1) but: {e}")
        pytest.skip(f"no PostgreSQL server: {e}")
    yield server
    server.stop()


class Serve:
    """One `offsite-admin serve` process."""

    def __init__(self, data_dir: Path, url: str, name: str, **env: str) -> None:
        self.log = data_dir.parent / f"{name}.log"
        cmd = [
            str(BIN / "offsite-admin"),
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            "--database-url",
            url,
            "--job-runner",
            "shared_job_runner:run",
            "--grace",
            "2",
        ]
        full_env = dict(os.environ, PYTHONPATH=str(TESTS / "helpers"), **env)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True, env=full_env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"{name} did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.address = line.split("listening on ")[1].split()[0]
        self.pid = self.proc.pid
        self.channel = open_channel(self.address, (data_dir / "admin.token").read_text().strip())
        self.jobs = jobs_pb2_grpc.JobsStub(self.channel)
        self.ops = operations_pb2_grpc.OperationsStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pair(pg, tmp_path_factory):
    url = pg.create_database(f"shared_{uuid.uuid4().hex[:12]}")
    data = tmp_path_factory.mktemp("shared") / "srv"
    a = Serve(data, url, "a", SHARED_RUNNER_PAUSE_AFTER="1")
    b = Serve(data, url, "b", SHARED_RUNNER_PAUSE_AFTER="1")
    try:
        models_pb2_grpc.ModelsStub(a.channel).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        op = models_pb2_grpc.EmulatorsStub(a.channel).BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny"))
        done = _wait_op(b, op.id)  # followed through the other server
        assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
        yield a, b, url, data, done.resource.split("/", 1)[1]
    finally:
        a.stop()
        b.stop()


def _wait_op(server: Serve, op_id: str, timeout: float = 300) -> operations_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = server.ops.GetOperation(operations_pb2.GetOperationRequest(id=op_id))
        if op.done:
            return op
        time.sleep(0.2)
    raise AssertionError(f"operation {op_id} did not finish in {timeout}s")


def _wait(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_job_runs_once_is_cancelled_through_the_other_and_resumes_there(pair):
    a, b, url, data, emulator = pair
    job = a.jobs.CreateJob(
        jobs_pb2.CreateJobRequest(name="shared", spec=jobs_pb2.JobSpec(emulator_id=emulator, rounds=3, min_clients=1))
    )
    assert b.jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).state == jobs_pb2.JOB_STATE_CREATED

    # Both servers are asked to start it at the same moment: exactly one runs it.
    results: dict[str, object] = {}
    go = threading.Barrier(2)

    def start(name: str, server: Serve) -> None:
        go.wait()
        try:
            results[name] = server.jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        except grpc.RpcError as e:
            results[name] = e

    threads = [threading.Thread(target=start, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = [n for n, r in results.items() if isinstance(r, grpc.RpcError)]
    assert len(refused) == 1, results
    loser = refused[0]
    assert (
        results[loser].code() == grpc.StatusCode.FAILED_PRECONDITION and "already running" in results[loser].details()
    )
    winner, other = (a, b) if loser == "b" else (b, a)
    op_id = results["a" if loser == "b" else "b"].id

    # The other server sees the job run (round 1 done, then paused) and its operation.
    _wait(lambda: other.jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).current_round == 1, what="round 1")
    assert other.jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).state == jobs_pb2.JOB_STATE_RUNNING
    assert (
        other.ops.GetOperation(operations_pb2.GetOperationRequest(id=op_id)).state
        == operations_pb2.OPERATION_STATE_RUNNING
    )

    # A third server starting on the same registry leaves the running job alone.
    third = Serve(data, url, "c")
    try:
        assert third.jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).state == jobs_pb2.JOB_STATE_RUNNING
        assert (
            third.ops.GetOperation(operations_pb2.GetOperationRequest(id=op_id)).state
            == operations_pb2.OPERATION_STATE_RUNNING
        )
    finally:
        third.stop()

    # Cancelled through the server that does not run it: the runner stops, the job is cancelled.
    cancelled = other.jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    assert _wait_op(winner, op_id, timeout=30).state == operations_pb2.OPERATION_STATE_CANCELLED
    runs_log = data / "work" / job.id / "runs.log"
    _wait(lambda: f"{winner.pid} end" in runs_log.read_text(), timeout=30, what="the running server to stop its runner")
    assert runs_log.read_text().splitlines() == [f"{winner.pid} start 1", f"{winner.pid} end cancelled"]
    assert other.jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).current_round == 1

    # Resumed through the other server: it runs rounds 2 and 3 only, and makes the release.
    resumed = other.jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
    assert _wait_op(other, resumed.id).state == operations_pb2.OPERATION_STATE_SUCCEEDED
    final = winner.jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id))
    assert final.state == jobs_pb2.JOB_STATE_COMPLETED and final.current_round == 3 and final.release_id
    rounds = other.jobs.ListRounds(jobs_pb2.ListRoundsRequest(job_id=job.id)).rounds
    assert [r.number for r in rounds] == [1, 2, 3]
    assert [int(r.metrics["pid"]) for r in rounds] == [winner.pid, other.pid, other.pid]
    # Two runs in all, one after the other: no round ran twice, nothing ran on two servers at once.
    assert runs_log.read_text().splitlines() == [
        f"{winner.pid} start 1",
        f"{winner.pid} end cancelled",
        f"{other.pid} start 2",
        f"{other.pid} end completed",
    ]


def test_two_schedulers_start_a_due_eval_once(pg):
    """Each server runs the eval scheduler: a due schedule starts once, whichever server claims it."""
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    from offsite.server.eval_scheduler import EvalScheduler
    from offsite.server.registry import Registry

    url = pg.create_database(f"sched_{uuid.uuid4().hex[:12]}")
    regs = [Registry(url), Registry(url)]
    due = datetime(2026, 1, 1, 3, 0)
    sched = regs[0].add_eval_schedule("nightly", "0 3 * * *", candidate="rel_x", next_run_at=due)
    started: list[str] = []
    lock = threading.Lock()

    def start_eval(state, candidate, base, suites, limit, created_by="", schedule_id=""):
        with lock:  # the stand-in for gate.start_eval: this test is about who starts it, not the eval
            started.append(created_by)
            return SimpleNamespace(id=f"op_{len(started)}")

    clock = lambda: due + timedelta(minutes=1)  # noqa: E731
    schedulers = [EvalScheduler(SimpleNamespace(registry=r), start_eval=start_eval, clock=clock) for r in regs]
    go = threading.Barrier(2)

    def tick(s: EvalScheduler) -> None:
        go.wait()
        s.tick()

    threads = [threading.Thread(target=tick, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(started) == 1, started
    row = regs[1].get_eval_schedule(sched.id)
    assert row.next_run_at == datetime(2026, 1, 2, 3, 0) and row.last_run_at == clock()
    for r in regs:
        r.close()
