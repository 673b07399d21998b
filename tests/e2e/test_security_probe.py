"""The outside probe's attacks (issue 10), each replayed against a real server on loopback.

Every test here failed before its fix: it is the attack, and the assertion is that the
server now refuses it. docs/security-model.md lists each attack with its test.
"""

from __future__ import annotations

import json
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
from offsite.server.app import ServerThread
from offsite.server.convert import struct
from offsite.server.state import ServerConfig
from offsite.server.testing import tiny_bundle

pytestmark = pytest.mark.e2e

GATE = {"verdict": "block", "deployable_level": "Medium"}


def fake_eval_runner(candidate, base, suites, limit, out_dir, progress=True, policy_path=None):
    """The safety team's runner stand-in: the verdict is set by the test; a run is complete
    only without --limit and suite subsets, as the real runner reports it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "run": {"complete": not limit, "limit": limit or 0, "suites": suites or []},
        "categories": [{"name": "disallowed_content", "level": "Low"}],
        "gate": {"verdict": GATE["verdict"], "policy": "default", "deployable_level": GATE["deployable_level"]},
        "base": str(base),
    }
    (out_dir / "report.json").write_text(json.dumps(report))
    return report


def fake_exporter(base_source, adapter_path, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    bundle = tiny_bundle()
    data_dir = tmp_path_factory.mktemp("srv")
    cfg = ServerConfig(
        data_dir=data_dir,
        port=0,
        signing_key=bundle.signing_key,
        eval_runner=fake_eval_runner,
        release_exporter=fake_exporter,
        background_tasks=[],
    )
    server = ServerThread(cfg).start()
    admin = open_channel(server.address, server.admin_token)
    adm = admin_pb2_grpc.AdminStub(admin)
    models = models_pb2_grpc.ModelsStub(admin)
    models.RegisterModel(models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama"))
    models.RegisterModel(models_pb2.RegisterModelRequest(name="other-family", source="tiny-gpt2"))
    chunks = iter([artifacts_pb2.UploadRequest(kind="bundle", name="b.tar", data=bundle.tar_path.read_bytes())])
    ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(chunks)
    emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
        models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
    )
    partner = adm.CreateToken(admin_pb2.CreateTokenRequest(name="acme", role="partner")).secret
    yield {
        "server": server,
        "state": server.server.state,
        "admin": admin,
        "partner": open_channel(server.address, partner),
        "partner_token": partner,
        "emulator": emu,
        "bundle_sha": ref.sha256,
        "data_dir": Path(server.server.state.data_dir),
    }
    server.stop()


def _code_and_details(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _wait_op(channel, op_id, timeout=60):
    ops = operations_pb2_grpc.OperationsStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = ops.GetOperation(operations_pb2.GetOperationRequest(id=op_id))
        if op.done:
            return op
        time.sleep(0.1)
    raise AssertionError(f"operation {op_id} did not finish in {timeout} s")


# ---- 1. job options reach the file system --------------------------------------------------------------
def test_job_options_cannot_name_server_paths(world, tmp_path):
    jobs = jobs_pb2_grpc.JobsStub(world["partner"])
    target = tmp_path / "victim"
    attack = {"app_dir": str(target / "app"), "flwr_home": str(target / "home"), "superlink": "x"}
    code, details = _code_and_details(
        lambda: jobs.CreateJob(
            jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=world["emulator"].id, options=struct(attack)))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert all(k in details for k in attack), details
    for options, train in [
        ({"corpus": "/etc/hostname"}, {}),
        ({"candidate_dir": str(target)}, {}),
        ({}, {"candidate_dir": str(target)}),
        ({"round_timeout": 1e9}, {}),
    ]:
        code, details = _code_and_details(
            lambda options=options, train=train: jobs.CreateJob(
                jobs_pb2.CreateJobRequest(
                    spec=jobs_pb2.JobSpec(
                        emulator_id=world["emulator"].id,
                        engine="simulation",
                        options=struct(options),
                        train_config=struct(train),
                    )
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (options, train)
        assert "examples" not in details  # no oracle for whether a server file exists
    assert not target.exists()


def test_a_stored_job_with_path_options_does_not_run(world, tmp_path):
    """A job row written before the fix (or into the database directly) is checked again by the runner."""
    state = world["state"]
    target = tmp_path / "victim-app"
    emu = world["emulator"]
    row = state.registry.add_job(
        "legacy",
        emu.model_id,
        emu.id,
        {
            "emulator_id": emu.id,
            "rounds": 1,
            "min_clients": 1,
            "fraction": 1.0,
            "engine": "deployment",
            "train_config": {},
            "options": {"app_dir": str(target), "flwr_home": str(target), "superlink": "x"},
        },
    )
    op = jobs_pb2_grpc.JobsStub(world["partner"]).StartJob(jobs_pb2.StartJobRequest(id=row.id))
    done = _wait_op(world["admin"], op.id)
    assert done.state == operations_pb2.OPERATION_STATE_FAILED and "app_dir" in done.error
    assert not target.exists()
    assert state.registry.get_job(row.id).state == "failed"


# ---- 2. a partner can flip a gate verdict ------------------------------------------------------------
def _release(world):
    state, emu = world["state"], world["emulator"]
    job = state.registry.add_job("gated", emu.model_id, emu.id, {"rounds": 1})
    adapter = state.store.put_bytes(b"adapter bytes")
    return state.registry.create_release(job.id, emu.model_id, adapter)


def _run_eval(world, channel, **kw):
    op = evals_pb2_grpc.EvalsStub(channel).RunEval(evals_pb2.RunEvalRequest(**kw))
    done = _wait_op(world["admin"], op.id)
    assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
    return done


def test_a_partner_cannot_flip_a_blocked_verdict(world):
    rel = _release(world)
    partner, admin = world["partner"], world["admin"]
    releases = releases_pb2_grpc.ReleasesStub(admin)
    GATE.update(verdict="block", deployable_level="Medium")
    _run_eval(world, partner, candidate=rel.id)
    assert releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id)).status == "blocked"
    # Another base (even another family) is refused: the gate's base is the release's own.
    GATE["verdict"] = "pass"
    code, details = _code_and_details(
        lambda: evals_pb2_grpc.EvalsStub(partner).RunEval(
            evals_pb2.RunEvalRequest(candidate=rel.id, base="other-family")
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "base" in details
    code, _ = _code_and_details(
        lambda: evals_pb2_grpc.EvalsStub(partner).CreateEvalSchedule(
            evals_pb2.CreateEvalScheduleRequest(cron="0 3 * * *", candidate=rel.id, base="other-family")
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Partial runs (a suite subset, a --limit) and a more lenient policy are kept, but decide nothing.
    for kw in ({"suites": ["refusal"]}, {"limit": 1}):
        done = _run_eval(world, partner, candidate=rel.id, **kw)
        assert done.result["verdict_applied"] is False and "partial" in done.result["why"]
    GATE["deployable_level"] = "High"
    done = _run_eval(world, partner, candidate=rel.id)
    assert done.result["verdict_applied"] is False and "less strict" in done.result["why"]
    rel_now = releases.GetRelease(releases_pb2.GetReleaseRequest(id=rel.id))
    assert rel_now.status == "blocked" and rel_now.gate_verdict == "block"
    code, _ = _code_and_details(lambda: releases.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # A complete run under the same policy may pass it; the history keeps every run, and the
    # approval says that an earlier run blocked.
    GATE["deployable_level"] = "Medium"
    done = _run_eval(world, partner, candidate=rel.id)
    assert done.result["verdict_applied"] is True
    history = (
        evals_pb2_grpc.EvalsStub(admin).ListEvalReports(evals_pb2.ListEvalReportsRequest(release_id=rel.id)).reports
    )
    assert [r.verdict for r in reversed(history)] == ["block", "pass", "pass", "pass", "pass"]
    approved = releases.ApproveRelease(releases_pb2.ApproveReleaseRequest(id=rel.id))
    assert approved.status == "approved" and "after an earlier block" in approved.reason


# ---- 3. data-owner scoping follows the token, not its name -----------------------------------------------
def test_data_owner_scope_is_the_tokens_jobs_and_enrollments(world):
    server, admin = world["server"], world["admin"]
    adm, emu = admin_pb2_grpc.AdminStub(admin), world["emulator"]
    jobs_admin = jobs_pb2_grpc.JobsStub(admin)
    job_a = jobs_admin.CreateJob(jobs_pb2.CreateJobRequest(name="a", spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    job_b = jobs_admin.CreateJob(jobs_pb2.CreateJobRequest(name="b", spec=jobs_pb2.JobSpec(emulator_id=emu.id)))
    new_token = lambda jobs: adm.CreateToken(admin_pb2.CreateTokenRequest(name="bob", role="data-owner", jobs=jobs))
    # An earlier "bob" enrolled in job_b (here: enrolled by an admin on bob's behalf, and by bob's old token).
    jobs_admin.Enroll(jobs_pb2.EnrollRequest(job_id=job_b.id, data_owner="bob"))
    old = new_token([job_b.id])
    jobs_pb2_grpc.JobsStub(open_channel(server.address, old.secret)).Enroll(jobs_pb2.EnrollRequest(job_id=job_b.id))
    # A new token, also named bob, for job_a only: it sees neither job_b nor its bundle.
    bob_a = new_token([job_a.id])
    ch = open_channel(server.address, bob_a.secret)
    jobs = jobs_pb2_grpc.JobsStub(ch)
    assert [j.id for j in jobs.ListJobs(jobs_pb2.ListJobsRequest()).jobs] == []
    code, _ = _code_and_details(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(id=job_b.id)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code_and_details(
        lambda: list(
            artifacts_pb2_grpc.ArtifactsStub(ch).Download(artifacts_pb2.DownloadRequest(sha256=world["bundle_sha"]))
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # A token naming no job sees nothing, even under an enrolled name.
    nothing = open_channel(server.address, new_token([]).secret)
    assert list(jobs_pb2_grpc.JobsStub(nothing).ListJobs(jobs_pb2.ListJobsRequest()).jobs) == []
    # Another live token cannot take over bob's enrollment in job_b.
    bob_b2 = new_token([job_b.id])
    code, details = _code_and_details(
        lambda: jobs_pb2_grpc.JobsStub(open_channel(server.address, bob_b2.secret)).Enroll(
            jobs_pb2.EnrollRequest(job_id=job_b.id)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another token" in details
    # After enrolling, bob_a sees job_a (and only it).
    jobs.Enroll(jobs_pb2.EnrollRequest(job_id=job_a.id))
    assert [j.id for j in jobs.ListJobs(jobs_pb2.ListJobsRequest()).jobs] == [job_a.id]
    # Revoking the old token ends its enrollment: bob leaves job_b.
    assert "bob" in jobs_admin.GetJob(jobs_pb2.GetJobRequest(id=job_b.id)).data_owners
    adm.RevokeToken(admin_pb2.RevokeTokenRequest(id=old.token.id))
    assert "bob" not in jobs_admin.GetJob(jobs_pb2.GetJobRequest(id=job_b.id)).data_owners
    events = [e.kind for e in jobs_admin.WatchJob(jobs_pb2.WatchJobRequest(id=job_b.id))]
    assert events[-1] == "unenrolled"


def test_revoking_an_admin_token_leaves_the_enrollments_it_made(world):
    server, state = world["server"], world["state"]
    emu = world["emulator"]
    job = state.registry.add_job("on-behalf", emu.model_id, emu.id, {"rounds": 1})
    secret, row = state.auth.create_token("second-admin", "admin")
    jobs_pb2_grpc.JobsStub(open_channel(server.address, secret)).Enroll(
        jobs_pb2.EnrollRequest(job_id=job.id, data_owner="erin")
    )
    admin_pb2_grpc.AdminStub(world["admin"]).RevokeToken(admin_pb2.RevokeTokenRequest(id=row.id))
    assert state.registry.enrolled_data_owners(job.id) == ["erin"]
