"""`offsite-admin releases ...`: candidate releases, the approval decision, export and merging."""

from __future__ import annotations

from pathlib import Path

import typer

from offsite.protos.v1 import operations_pb2, releases_pb2, releases_pb2_grpc

from .ops import download_to
from .remote import (
    CONNECTION,
    JsonOption,
    call,
    console,
    emit_json,
    fail,
    finish_operation,
    fmt_time,
    follow_operation,
    op_summary,
    show_message,
    table,
    to_dict,
)

app = typer.Typer(no_args_is_help=True, help="List, approve, reject, export and merge releases.")


def _stub() -> releases_pb2_grpc.ReleasesStub:
    return releases_pb2_grpc.ReleasesStub(CONNECTION.channel())


@app.command("list")
def list_(
    status: str = typer.Option("", "--status", help="pending-gate | approved | rejected | released | blocked"),
    job: str = typer.Option("", "--job"),
    limit: int = typer.Option(0, "--limit"),
    json_out: bool = JsonOption,
) -> None:
    """List releases.

    Example: offsite-admin releases list --status pending-gate
    """
    resp = call(
        _stub().ListReleases,
        releases_pb2.ListReleasesRequest(status=status, job_id=job, limit=limit),
        json_out=json_out,
    )
    if json_out:
        emit_json([to_dict(r) for r in resp.releases])
        return
    table(
        "releases",
        ["id", "job", "status", "gate", "report", "decided by", "reason", "created"],
        [
            (
                r.id,
                r.job_id,
                r.status,
                r.gate_verdict or "-",
                r.gate_report_id,
                r.decided_by,
                r.reason[:40],
                fmt_time(r.created_at),
            )
            for r in resp.releases
        ],
    )


@app.command("get")
def get(release_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Show one release.

    Example: offsite-admin releases get rel_1a2b3c4d5e6f
    """
    show_message(
        "release", call(_stub().GetRelease, releases_pb2.GetReleaseRequest(id=release_id), json_out=json_out), json_out
    )


@app.command("approve")
def approve(
    release_id: str = typer.Argument(...),
    override_reason: str = typer.Option(
        "", "--override-reason", help="approve although the gate did not pass (audited)"
    ),
    json_out: bool = JsonOption,
) -> None:
    """Approve a release that passed the safety gate (admins only).

    Example: offsite-admin releases approve rel_1a2b3c4d5e6f
    """
    resp = call(
        _stub().ApproveRelease,
        releases_pb2.ApproveReleaseRequest(id=release_id, override_reason=override_reason),
        json_out=json_out,
    )
    show_message(f"release {resp.id}", resp, json_out)


@app.command("reject")
def reject(
    release_id: str = typer.Argument(...), reason: str = typer.Option(..., "--reason"), json_out: bool = JsonOption
) -> None:
    """Reject a release, with a reason (admins only).

    Example: offsite-admin releases reject rel_1a2b3c4d5e6f --reason "forgets Python syntax"
    """
    resp = call(
        _stub().RejectRelease, releases_pb2.RejectReleaseRequest(id=release_id, reason=reason), json_out=json_out
    )
    show_message(f"release {resp.id}", resp, json_out)


@app.command("export")
def export(
    release_id: str = typer.Argument(...),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    json_out: bool = JsonOption,
) -> None:
    """Plug the adapter into the base model and store the HF directory as an artifact (approved releases).

    Example: offsite-admin releases export rel_1a2b3c4d5e6f && offsite-admin artifacts download SHA --out model.tar
    """
    op = call(_stub().ExportRelease, releases_pb2.ExportReleaseRequest(id=release_id), json_out=json_out)
    finish_operation(op, wait, json_out)


@app.command("merge")
def merge(
    release_ids: list[str] = typer.Argument(..., help="two or more releases of one base model"),
    method: str = typer.Option("ties", "--method", help="average | task-arithmetic | ties | dare"),
    weights: str = typer.Option("", "--weights", help="comma-separated, one per release in order (default: equal)"),
    scale: float = typer.Option(None, "--scale", help="lambda of task-arithmetic, ties and dare (default 1)"),
    density: float = typer.Option(
        None, "--density", help="ties: fraction of each delta kept by magnitude (default 0.2)"
    ),
    drop_rate: float = typer.Option(
        None, "--drop-rate", help="dare: probability of dropping a delta entry (default 0.5)"
    ),
    majority_sign: str = typer.Option("", "--majority-sign", help="ties: total (default) | frequency"),
    seed: int = typer.Option(None, "--seed", help="dare: seed of the random drops (default 0)"),
    allow_ungated: bool = typer.Option(
        False, "--allow-ungated", help="merge releases still pending or blocked at the gate (admins only, audited)"
    ),
    out: Path = typer.Option(None, "--out", help="also download the merged adapter (safetensors) to this file"),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    json_out: bool = JsonOption,
) -> None:
    """Merge the adapters of releases of one base model into a new pending-gate release (its parents recorded);
    the merge then goes through the safety gate like any release.

    Example: offsite-admin releases merge rel_1a2b3c4d5e6f rel_6f5e4d3c2b1a --method ties --density 0.2 --out merged.safetensors
    """
    if out is not None and not wait:
        fail("--out needs the merge to finish first: drop --no-wait", json_out)
    if out is not None and not out.parent.is_dir():
        fail(f"--out {out}: the folder {out.parent} does not exist; create it or pick another path", json_out)
    try:
        w = [float(x) for x in weights.split(",")] if weights.strip() else []
    except ValueError:
        fail(f"--weights {weights!r}: expected comma-separated numbers, one per release, e.g. 0.5,0.5", json_out)
    req = releases_pb2.MergeReleasesRequest(
        release_ids=release_ids, method=method, weights=w, majority_sign=majority_sign, allow_ungated=allow_ungated
    )
    for name, value in (("scale", scale), ("density", density), ("drop_rate", drop_rate), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    op = call(_stub().MergeReleases, req, json_out=json_out)
    if out is None:
        finish_operation(op, wait, json_out)
        return
    op = follow_operation(op, json_out)
    if op.state != operations_pb2.OPERATION_STATE_SUCCEEDED:
        finish_operation(op, False, json_out)
        raise typer.Exit(1)
    sha = to_dict(op).get("result", {}).get("adapter_sha256", "")
    size = download_to(sha, out, json_out)
    summary = {**op_summary(op), "adapter_path": str(out), "adapter_bytes": size}
    if json_out:
        emit_json(summary)
    else:
        console.print(
            f"merged release {summary.get('result', {}).get('release_id', '')}: adapter written to {out} "
            f"({size} bytes, sha256 verified)",
            highlight=False,
        )
