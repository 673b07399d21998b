"""A job that cannot run must not hold the server (issue 10.5): a failed `flwr run` fails the
job at once, CancelJob ends the runner's child processes, long jobs have their own workers,
and SIGTERM ends the server within --grace even when a job ignores cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    evals_pb2,
    evals_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
)
from offsite.server.app import ServerThread
from offsite.server.state import ServerConfig
from offsite.server.testing import ServerProcess

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def child_runner(ctx) -> None:
    """Waits on a child process and never checks for cancellation itself."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    (Path(ctx.work_dir) / "child.pid").write_text(str(proc.pid))
    track = getattr(ctx.op, "track_process", None)  # (absent before the fix: the test then shows the hole)
    if track is not None:
        track(proc)
    proc.wait()
    ctx.op.check_cancelled()


def stubborn_runner(ctx) -> None:
    """Ignores cancellation entirely (a thread nobody can stop), with a child process."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    (Path(ctx.work_dir) / "child.pid").write_text(str(proc.pid))
    ctx.op.track_process(proc)
    while True:
        time.sleep(0.1)


def eval_runner(candidate, base, suites, limit, out_dir, progress=True, policy_path=None):
    return {"gate": {"verdict": "block"}, "categories": []}


def _job(reg, name="j"):
    model = reg.add_model(f"m-{name}", "tiny-llama")
    emu = reg.add_emulator(model.id, "0" * 64, {}, {})
    spec = {
        "emulator_id": emu.id,
        "rounds": 1,
        "min_clients": 1,
        "fraction": 1.0,
        "engine": "deployment",
        "train_config": {},
        "options": {},
    }
    return reg.add_job(name, model.id, emu.id, spec)


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_cancel_terminates_the_runners_child_process(tmp_path):
    cfg = ServerConfig(data_dir=tmp_path / "srv", port=0, job_runner=child_runner, background_tasks=[])
    with ServerThread(cfg) as server:
        reg = server.server.state.registry
        jobs = jobs_pb2_grpc.JobsStub(open_channel(server.address, server.admin_token))
        job = _job(reg)
        op = jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        pid_file = server.server.state.work_dir / job.id / "child.pid"
        assert _wait(pid_file.exists)
        pid = int(pid_file.read_text())
        cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
        assert _wait(lambda: not _alive(pid), 10), "the runner's child process outlived CancelJob"
        ops = operations_pb2_grpc.OperationsStub(open_channel(server.address, server.admin_token))
        assert _wait(
            lambda: (
                ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id)).state
                == operations_pb2.OPERATION_STATE_CANCELLED
            )
        )


def test_long_jobs_do_not_hold_up_short_operations(tmp_path):
    cfg = ServerConfig(
        data_dir=tmp_path / "srv", port=0, job_runner=child_runner, eval_runner=eval_runner, background_tasks=[]
    )
    with ServerThread(cfg) as server:
        reg = server.server.state.registry
        admin = open_channel(server.address, server.admin_token)
        jobs = jobs_pb2_grpc.JobsStub(admin)
        started = [_job(reg, f"j{i}") for i in range(cfg.op_workers + getattr(cfg, "job_workers", 0))]
        for job in started:
            jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        reg.add_model("evalme", "tiny-llama")
        op = evals_pb2_grpc.EvalsStub(admin).RunEval(evals_pb2.RunEvalRequest(candidate="evalme"))
        ops = operations_pb2_grpc.OperationsStub(admin)
        assert _wait(lambda: ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id)).done, 30), (
            "an eval waited behind long jobs"
        )
        for job in started:
            jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job.id))


def test_a_failed_flwr_run_fails_the_job_at_once(tmp_path):
    """`flwr run` exits 0 with success: false when the SuperLink is unreachable."""
    data_dir = tmp_path / "srv"
    home = data_dir / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "offsite"\n\n[superlink.offsite]\naddress = "127.0.0.1:1"\ninsecure = true\n'
    )
    from offsite.server.testing import tiny_bundle

    bundle = tiny_bundle()
    cfg = ServerConfig(data_dir=data_dir, port=0, background_tasks=[], signing_key=bundle.signing_key)
    with ServerThread(cfg) as server:
        state = server.server.state
        model = state.registry.add_model("tiny", "tiny-llama")
        sha = state.store.put_file(bundle.tar_path)
        emu = state.registry.add_emulator(model.id, sha, {}, {})
        spec = {
            "emulator_id": emu.id,
            "rounds": 2,
            "min_clients": 1,
            "fraction": 1.0,
            "engine": "deployment",
            "train_config": {},
            "options": {"round_timeout": 3600},
        }
        job = state.registry.add_job("unreachable", model.id, emu.id, spec)
        admin = open_channel(server.address, server.admin_token)
        op = jobs_pb2_grpc.JobsStub(admin).StartJob(jobs_pb2.StartJobRequest(id=job.id))
        ops = operations_pb2_grpc.OperationsStub(admin)
        t0 = time.monotonic()
        assert _wait(lambda: ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id)).done, 240)
        done = ops.GetOperation(operations_pb2.GetOperationRequest(id=op.id))
        assert done.state == operations_pb2.OPERATION_STATE_FAILED and "did not start the job" in done.error
        assert time.monotonic() - t0 < 240  # before: rounds x round timeout + 600 s
        assert state.registry.get_job(job.id).state == "failed"


def test_sigterm_exits_within_grace_even_with_a_stubborn_job(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    grace = 2
    server = ServerProcess(
        tmp_path / "srv",
        env=env,
        extra_args=["--job-runner", "test_server_job_control:stubborn_runner", "--grace", str(grace)],
    )
    with server:
        from offsite.server.registry import Registry

        reg = Registry.for_data_dir(server.data_dir)
        job = _job(reg)
        jobs_pb2_grpc.JobsStub(open_channel(server.address, server.admin_token)).StartJob(
            jobs_pb2.StartJobRequest(id=job.id)
        )
        pid_file = server.data_dir / "work" / job.id / "child.pid"
        assert _wait(pid_file.exists)
        pid = int(pid_file.read_text())
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(grace + 15)
        took = time.monotonic() - t0
        assert rc == 0 and took < grace + 6, f"exit {rc} after {took:.1f} s"
        assert _wait(lambda: not _alive(pid), 10), "the job's child process outlived the server"
        assert reg.get_operation(reg.get_job(job.id).operation_id).state == "cancelled"
        reg.close()
