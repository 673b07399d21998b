"""`offsite-admin jobs ...`: federated jobs on the server.

(`offsite-admin jobs local run --engine simulation` is the one-machine path; these commands
drive jobs on a running server.)
"""

from __future__ import annotations

import typer
from google.protobuf.struct_pb2 import Struct

from offsite.protos.v1 import jobs_pb2, jobs_pb2_grpc

from .remote import (
    CONNECTION,
    JsonOption,
    call,
    console,
    emit_json,
    fail,
    finish_operation,
    fmt_time,
    parse_json_option,
    show_message,
    table,
    to_dict,
)

app = typer.Typer(no_args_is_help=True, help="Create, start, follow and cancel federated jobs on the server.")
JOB_STATE = {name.removeprefix("JOB_STATE_").lower(): value for name, value in jobs_pb2.JobState.items() if value}
STATE_NAMES = {v: k for k, v in JOB_STATE.items()}


def struct(data: dict) -> Struct:
    out = Struct()
    out.update(data)
    return out


def _stub() -> jobs_pb2_grpc.JobsStub:
    return jobs_pb2_grpc.JobsStub(CONNECTION.channel())


def _job_row(j) -> tuple:
    return (
        j.id,
        j.name,
        STATE_NAMES.get(j.state, "?"),
        f"{j.current_round}/{j.spec.rounds}",
        j.spec.engine,
        j.spec.emulator_id,
        len(j.data_owners),
        j.release_id,
        fmt_time(j.created_at),
    )


_COLUMNS = ["id", "name", "state", "round", "engine", "emulator", "data owners", "release", "created"]


@app.command("create")
def create(
    emulator: str = typer.Option(..., "--emulator", help="emulator bundle id (emu_...)"),
    name: str = typer.Option("", "--name"),
    rounds: int = typer.Option(3, "--rounds"),
    min_clients: int = typer.Option(2, "--min-clients"),
    fraction: float = typer.Option(1.0, "--fraction", help="share of enrolled clients per round"),
    engine: str = typer.Option("deployment", "--engine", help="deployment | simulation"),
    train_config: str = typer.Option(
        "", "--train-config", help='JSON or @file: TrainConfig fields, e.g. {"steps": 20}'
    ),
    options: str = typer.Option(
        "", "--options", help='JSON or @file: dp, secagg, norm bounds, e.g. {"dp": {"noise": 0.5}}'
    ),
    json_out: bool = JsonOption,
) -> None:
    """Create a job that data owners can enroll in.

    Example: offsite-admin jobs create --emulator emu_1a2b3c4d5e6f --rounds 5 --min-clients 3
    """
    spec = jobs_pb2.JobSpec(
        emulator_id=emulator,
        rounds=rounds,
        min_clients=min_clients,
        fraction=fraction,
        engine=engine,
        train_config=struct(parse_json_option(train_config, "--train-config")),
        options=struct(parse_json_option(options, "--options")),
    )
    resp = call(_stub().CreateJob, jobs_pb2.CreateJobRequest(name=name, spec=spec), json_out=json_out)
    if json_out:
        emit_json(to_dict(resp))
    else:
        table("jobs", _COLUMNS, [_job_row(resp)])
        console.print(
            f"data owners need a token: offsite-admin tokens create --role data-owner --name NAME --job {resp.id}"
        )


@app.command("list")
def list_(
    state: str = typer.Option("", "--state", help="created | running | completed | failed | cancelled"),
    limit: int = typer.Option(0, "--limit"),
    json_out: bool = JsonOption,
) -> None:
    """List jobs (data owners see only the jobs they are enrolled in).

    Example: offsite-admin jobs list --state running
    """
    if state and state not in JOB_STATE:
        fail(f"--state {state!r} is not one of {', '.join(JOB_STATE)}")
    resp = call(
        _stub().ListJobs, jobs_pb2.ListJobsRequest(state=JOB_STATE.get(state, 0), limit=limit), json_out=json_out
    )
    if json_out:
        emit_json([to_dict(j) for j in resp.jobs])
        return
    table("jobs", _COLUMNS, [_job_row(j) for j in resp.jobs])


@app.command("get")
def get(job_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Show a job with its rounds.

    Example: offsite-admin jobs get job_1a2b3c4d5e6f --json
    """
    job = call(_stub().GetJob, jobs_pb2.GetJobRequest(id=job_id), json_out=json_out)
    rounds = call(_stub().ListRounds, jobs_pb2.ListRoundsRequest(job_id=job_id), json_out=json_out)
    if json_out:
        emit_json({**to_dict(job), "rounds": [to_dict(r) for r in rounds.rounds]})
        return
    show_message(f"job {job.id}", job, False)
    table(
        "rounds",
        ["round", "metrics", "adapter", "at"],
        [(r.number, to_dict(r.metrics), r.adapter.sha256[:16], fmt_time(r.created_at)) for r in rounds.rounds],
    )


@app.command("watch")
def watch(
    job_id: str = typer.Argument(...),
    after: int = typer.Option(0, "--after", help="only events after this seq"),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="keep streaming until the job ends"),
    json_out: bool = JsonOption,
) -> None:
    """Stream a job's events (enrollments, state changes, rounds, release); JSON lines with --json.

    Example: offsite-admin jobs watch job_1a2b3c4d5e6f
    """
    stream = call(
        _stub().WatchJob, jobs_pb2.WatchJobRequest(id=job_id, after_seq=after, follow=follow), json_out=json_out
    )
    try:
        for ev in stream:
            if json_out:
                emit_json(to_dict(ev), indent=None)
            else:
                console.print(
                    f"[dim]{fmt_time(ev.at)} #{ev.seq}[/dim] [bold]{ev.kind}[/bold] {to_dict(ev.data)}", highlight=False
                )
    except KeyboardInterrupt:
        pass
    except Exception as e:
        fail(f"watch ended: {e}", json_out, code=1)


@app.command("start")
def start(
    job_id: str = typer.Argument(...), wait: bool = typer.Option(False, "--wait/--no-wait"), json_out: bool = JsonOption
) -> None:
    """Run a job with the server's job runner (an operation).

    Example: offsite-admin jobs start job_1a2b3c4d5e6f --wait
    """
    finish_operation(call(_stub().StartJob, jobs_pb2.StartJobRequest(id=job_id), json_out=json_out), wait, json_out)


@app.command("cancel")
def cancel(job_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Cancel a job (a running one stops after its current step).

    Example: offsite-admin jobs cancel job_1a2b3c4d5e6f
    """
    resp = call(_stub().CancelJob, jobs_pb2.CancelJobRequest(id=job_id), json_out=json_out)
    if json_out:
        emit_json(to_dict(resp))
    else:
        table("jobs", _COLUMNS, [_job_row(resp)])


@app.command("enroll")
def enroll(
    job_id: str = typer.Argument(...), data_owner: str = typer.Option(..., "--data-owner"), json_out: bool = JsonOption
) -> None:
    """Enroll a data owner on its behalf (admins; data owners use `offsite-client enroll`).

    Example: offsite-admin jobs enroll job_1a2b3c4d5e6f --data-owner alice
    """
    resp = call(_stub().Enroll, jobs_pb2.EnrollRequest(job_id=job_id, data_owner=data_owner), json_out=json_out)
    if json_out:
        d = to_dict(resp)
        d["bundle_public_key"] = resp.bundle_public_key.decode()
        emit_json(d)
    else:
        console.print(
            f"enrolled {resp.data_owner} in {resp.job_id}; bundle {resp.bundle.sha256} ({resp.bundle.size} bytes)"
        )
