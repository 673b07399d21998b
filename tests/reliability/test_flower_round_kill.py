"""`kill -9` of `offsite-admin serve` mid-round with the real Flower job runner, then a restart.

The job runs through the server's default runner (`offsite.server.federation:run_job`):
`flwr run` on the job's local simulation SuperLink, two virtual data owners on the tiny
model. The server is killed inside round 2. Nothing it started may keep running (an orphaned
SuperLink would go on writing rounds and a release into the registry behind the restarted
server's back); after the restart the job is failed with the reason, round 1 is kept, and
StartJob resumes at round 2 to exactly one candidate with rounds 1-3 recorded once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from google.protobuf.struct_pb2 import Struct

from offsite.protos.channel import open_channel
from offsite.protos.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    releases_pb2,
    releases_pb2_grpc,
)
from offsite.server.testing import tiny_bundle

from .test_server_kill import _server, _wait_job, assert_registry_intact, assert_store_whole


def processes_under(root: Path) -> list[str]:
    """Live processes started for this server: cwd or FLWR_HOME under its data directory."""
    found, mark = [], str(root).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, IndexError):
            continue
        if cwd.startswith(mark) or mark in env:
            found.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
    return found


def _struct(d: dict) -> Struct:
    s = Struct()
    s.update(d)
    return s


def _simulation_job(admin, bundle) -> jobs_pb2.Job:
    """A 3-round simulation job of two virtual data owners on the tiny model."""
    models_pb2_grpc.ModelsStub(admin).RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(
        iter([artifacts_pb2.UploadRequest(kind="bundle", data=bundle.tar_path.read_bytes())])
    )
    emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
        models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
    )
    spec = jobs_pb2.JobSpec(
        emulator_id=emu.id,
        rounds=3,
        min_clients=2,
        engine="simulation",
        train_config=_struct({"local_steps": 1, "batch_size": 1, "block_size": 64}),
        options=_struct({"clients": 2, "heldout_limit": 2, "round_timeout": 300}),
    )
    return jobs_pb2_grpc.JobsStub(admin).CreateJob(jobs_pb2.CreateJobRequest(spec=spec))


def test_cancel_stops_a_simulation_job_and_its_processes_at_once(tmp_path):
    """As for a deployment (`flwr stop`): CancelJob ends the run now, not after the round."""
    bundle = tiny_bundle()
    srv = _server(tmp_path, "--signing-key", str(bundle.signing_key)).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        job = _simulation_job(admin, bundle)
        jobs = jobs_pb2_grpc.JobsStub(admin)
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        deadline = time.monotonic() + 300
        while not any(b"flwr-simulation" in p.encode() for p in processes_under(srv.data_dir)):
            assert time.monotonic() < deadline, "the simulation never started"
            time.sleep(0.2)
        t0 = time.monotonic()
        assert jobs.CancelJob(jobs_pb2.CancelJobRequest(id=job.id)).state == jobs_pb2.JOB_STATE_CANCELLED
        while (left := processes_under(srv.data_dir)) and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        assert not left, f"CancelJob left the simulation running: {left}"
        assert jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).current_round == 0  # it did not finish a round first
    finally:
        srv.kill()


def test_kill_mid_round_with_the_flower_runner_resumes_to_one_candidate(tmp_path):
    bundle = tiny_bundle()
    srv = _server(tmp_path, "--signing-key", str(bundle.signing_key)).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        jobs = jobs_pb2_grpc.JobsStub(admin)
        job = _simulation_job(admin, bundle)
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))
        _wait_job(jobs, job.id, lambda j: j.current_round >= 1 or j.state == jobs_pb2.JOB_STATE_FAILED, timeout=600)
        assert jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id)).current_round == 1, "round 2 ended before the kill"
        assert processes_under(srv.data_dir), "the Flower runner runs no child process (nothing to check)"
        srv.kill()  # inside round 2
        admin.close()
        deadline = time.monotonic() + 30
        while (left := processes_under(srv.data_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"the killed server's Flower processes kept running: {left}"

        srv.start()
        admin = open_channel(srv.address, srv.admin_token)
        jobs = jobs_pb2_grpc.JobsStub(admin)
        stale = jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id))
        assert stale.state == jobs_pb2.JOB_STATE_FAILED and "server stopped" in stale.error
        assert [r.number for r in jobs.ListRounds(jobs_pb2.ListRoundsRequest(job_id=job.id)).rounds] == [1]
        jobs.StartJob(jobs_pb2.StartJobRequest(id=job.id))  # resumes at round 2
        done = _wait_job(
            jobs,
            job.id,
            lambda j: j.state in (jobs_pb2.JOB_STATE_COMPLETED, jobs_pb2.JOB_STATE_FAILED),
            timeout=900,
        )
        assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done.error
        assert [r.number for r in jobs.ListRounds(jobs_pb2.ListRoundsRequest(job_id=job.id)).rounds] == [1, 2, 3]
        releases = releases_pb2_grpc.ReleasesStub(admin).ListReleases(releases_pb2.ListReleasesRequest(job_id=job.id))
        assert len(releases.releases) == 1 and done.release_id == releases.releases[0].id
        # The ServerApp marks the job completed itself; the runner then lets the Flower run end
        # and stops its SuperLink tree (bounded: the run's end, then the guard's grace).
        deadline = time.monotonic() + 60
        while (left := processes_under(srv.data_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"a finished job left Flower processes running: {left}"
    finally:
        srv.kill()
    assert_store_whole(srv.data_dir)
    assert_registry_intact(srv.data_dir)
