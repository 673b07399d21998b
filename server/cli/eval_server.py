"""`offsite-admin evals ...`: safety evals run *by the server* (reports kept as artifacts) and
their cron schedules, over gRPC. (`offsite-admin evals local ...` runs evals on this machine.)
"""

from __future__ import annotations

import typer

from offsite.protos.v1 import evals_pb2, evals_pb2_grpc

from .remote import (
    CONNECTION,
    JsonOption,
    call,
    console,
    emit_json,
    finish_operation,
    fmt_time,
    show_message,
    table,
    to_dict,
)

app = typer.Typer(no_args_is_help=True, help="Run safety evals on the server; list reports; manage schedules.")
schedule_app = typer.Typer(no_args_is_help=True, help="Cron schedules of server-side evals.")
app.add_typer(schedule_app, name="schedule")


def _stub() -> evals_pb2_grpc.EvalsStub:
    return evals_pb2_grpc.EvalsStub(CONNECTION.channel())


@app.command("run")
def run(
    candidate: str = typer.Option(..., "--candidate", help="release id (rel_...) or model id/name"),
    base: str = typer.Option("", "--base", help="base model id/name (default: the candidate's base)"),
    suites: list[str] = typer.Option([], "--suite", help="suite name (repeatable; default: all)"),
    limit: int = typer.Option(0, "--limit", help="items per suite (0 = all)"),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    json_out: bool = JsonOption,
) -> None:
    """Run the safety suites on the server; a release's gate verdict is updated.

    Example: offsite-admin evals run --candidate rel_1a2b3c4d5e6f --limit 20
    """
    op = call(
        _stub().RunEval,
        evals_pb2.RunEvalRequest(candidate=candidate, base=base, suites=suites, limit=limit),
        json_out=json_out,
    )
    finish_operation(op, wait, json_out)


@app.command("reports")
def reports(
    release: str = typer.Option("", "--release"),
    schedule: str = typer.Option("", "--schedule"),
    limit: int = typer.Option(0, "--limit"),
    json_out: bool = JsonOption,
) -> None:
    """List eval reports, newest first.

    Example: offsite-admin evals reports --release rel_1a2b3c4d5e6f
    """
    resp = call(
        _stub().ListEvalReports,
        evals_pb2.ListEvalReportsRequest(release_id=release, schedule_id=schedule, limit=limit),
        json_out=json_out,
    )
    if json_out:
        emit_json([to_dict(r) for r in resp.reports])
        return
    table(
        "eval reports",
        ["id", "candidate", "base", "verdict", "levels", "html", "created"],
        [
            (
                r.id,
                r.candidate,
                r.base,
                r.verdict,
                ", ".join(f"{c.name}:{c.level}" for c in r.categories),
                r.report_html.sha256[:16],
                fmt_time(r.created_at),
            )
            for r in resp.reports
        ],
    )


@app.command("report")
def report(report_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Show one report (download its files with `offsite-admin artifacts download`).

    Example: offsite-admin evals report rep_1a2b3c4d5e6f
    """
    show_message(
        "eval report",
        call(_stub().GetEvalReport, evals_pb2.GetEvalReportRequest(id=report_id), json_out=json_out),
        json_out,
    )


@schedule_app.command("create")
def schedule_create(
    cron: str = typer.Option(..., "--cron", help="five-field cron, UTC, e.g. '0 3 * * *'"),
    candidate: str = typer.Option(..., "--candidate"),
    base: str = typer.Option("", "--base"),
    suites: list[str] = typer.Option([], "--suite"),
    limit: int = typer.Option(0, "--limit"),
    name: str = typer.Option("", "--name"),
    json_out: bool = JsonOption,
) -> None:
    """Schedule an eval.

    Example: offsite-admin evals schedule create --cron '0 3 * * *' --candidate rel_1a2b3c4d5e6f
    """
    resp = call(
        _stub().CreateEvalSchedule,
        evals_pb2.CreateEvalScheduleRequest(
            name=name, cron=cron, candidate=candidate, base=base, suites=suites, limit=limit
        ),
        json_out=json_out,
    )
    show_message(f"schedule {resp.id}", resp, json_out)


@schedule_app.command("list")
def schedule_list(json_out: bool = JsonOption) -> None:
    """List eval schedules.

    Example: offsite-admin evals schedule list --json
    """
    resp = call(_stub().ListEvalSchedules, evals_pb2.ListEvalSchedulesRequest(), json_out=json_out)
    if json_out:
        emit_json([to_dict(s) for s in resp.schedules])
        return
    table(
        "eval schedules",
        ["id", "name", "cron", "candidate", "next run", "last report"],
        [(s.id, s.name, s.cron, s.candidate, fmt_time(s.next_run_at), s.last_report_id) for s in resp.schedules],
    )


@schedule_app.command("delete")
def schedule_delete(schedule_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Delete an eval schedule.

    Example: offsite-admin evals schedule delete sch_1a2b3c4d5e6f
    """
    call(_stub().DeleteEvalSchedule, evals_pb2.DeleteEvalScheduleRequest(id=schedule_id), json_out=json_out)
    if json_out:
        emit_json({"ok": True, "deleted": schedule_id})
    else:
        console.print(f"deleted {schedule_id}")
