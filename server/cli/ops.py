"""`offsite-admin ops ...` (long-running operations) and `offsite-admin artifacts ...`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, operations_pb2, operations_pb2_grpc

from .remote import (
    CONNECTION,
    JsonOption,
    call,
    console,
    emit_json,
    err_console,
    fail,
    finish_operation,
    fmt_time,
    op_summary,
    table,
    to_dict,
)

app = typer.Typer(no_args_is_help=True, help="Follow, list and cancel long-running operations.")
artifacts_app = typer.Typer(no_args_is_help=True, help="Inspect and download artifacts by sha256.")


def _stub() -> operations_pb2_grpc.OperationsStub:
    return operations_pb2_grpc.OperationsStub(CONNECTION.channel())


@app.command("list")
def list_(
    kind: str = typer.Option("", "--kind", help="emulator-build | eval-run | release-export | job-run"),
    limit: int = typer.Option(0, "--limit"),
    json_out: bool = JsonOption,
) -> None:
    """List operations, newest first.

    Example: offsite-admin ops list --kind emulator-build
    """
    resp = call(_stub().ListOperations, operations_pb2.ListOperationsRequest(kind=kind, limit=limit), json_out=json_out)
    if json_out:
        emit_json([op_summary(o) for o in resp.operations])
        return
    table(
        "operations",
        ["id", "kind", "state", "progress", "message", "resource", "created"],
        [
            (
                o.id,
                o.kind,
                op_summary(o)["state"],
                f"{o.progress:.0%}",
                (o.error or o.message)[:60],
                o.resource,
                fmt_time(o.created_at),
            )
            for o in resp.operations
        ],
    )


@app.command("get")
def get(op_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Show one operation.

    Example: offsite-admin ops get op_1a2b3c4d5e6f
    """
    finish_operation(
        call(_stub().GetOperation, operations_pb2.GetOperationRequest(id=op_id), json_out=json_out),
        wait=False,
        json_out=json_out,
    )


@app.command("watch")
def watch(op_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Follow an operation to its end with a progress bar.

    Example: offsite-admin ops watch op_1a2b3c4d5e6f
    """
    op = call(_stub().GetOperation, operations_pb2.GetOperationRequest(id=op_id), json_out=json_out)
    finish_operation(op, wait=True, json_out=json_out)


@app.command("cancel")
def cancel(op_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Cancel an operation (work stops at its next progress step).

    Example: offsite-admin ops cancel op_1a2b3c4d5e6f
    """
    op = call(_stub().CancelOperation, operations_pb2.CancelOperationRequest(id=op_id), json_out=json_out)
    finish_operation(op, wait=False, json_out=json_out)


def _artifacts() -> artifacts_pb2_grpc.ArtifactsStub:
    return artifacts_pb2_grpc.ArtifactsStub(CONNECTION.channel())


@artifacts_app.command("stat")
def stat(sha256: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Show an artifact's size, kind and name.

    Example: offsite-admin artifacts stat 3f2a...
    """
    ref = call(_artifacts().StatArtifact, artifacts_pb2.StatArtifactRequest(sha256=sha256), json_out=json_out)
    if json_out:
        emit_json(to_dict(ref))
    else:
        console.print(f"{ref.sha256}  {ref.size} bytes  {ref.kind}  {ref.name}")


@artifacts_app.command("download")
def download(
    sha256: str = typer.Argument(...),
    out: Path = typer.Option(..., "--out", help="file to write"),
    json_out: bool = JsonOption,
) -> None:
    """Download an artifact, resuming a partial OUT.part, and check its sha256.

    Example: offsite-admin artifacts download 3f2a... --out report.html
    """
    size = download_to(sha256, out, json_out)
    if json_out:
        emit_json({"ok": True, "path": str(out), "sha256": sha256, "size": size})
    else:
        console.print(f"wrote {out} ({size} bytes, sha256 verified)")


def download_to(sha256: str, out: Path, json_out: bool) -> int:
    """Download an artifact to `out` (resuming `out`.part), check its sha256; returns its size."""
    part = out.with_name(out.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    stub = _artifacts()
    ref = call(stub.StatArtifact, artifacts_pb2.StatArtifactRequest(sha256=sha256), json_out=json_out)
    if offset > ref.size:
        part.unlink()
        offset = 0
    with (
        open(part, "ab") as fh,
        Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err_console, disable=json_out) as bar,
    ):
        task = bar.add_task("download", total=ref.size, completed=offset)
        stream = call(stub.Download, artifacts_pb2.DownloadRequest(sha256=sha256, offset=offset), json_out=json_out)
        try:
            for chunk in stream:
                fh.write(chunk.data)
                bar.update(task, advance=len(chunk.data))
        except Exception as e:  # grpc.RpcError mid-stream: keep the part for the next try
            fail(f"download interrupted ({e}); run the same command again to resume", json_out, code=1)
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while data := fh.read(1 << 20):
            digest.update(data)
    if digest.hexdigest() != sha256:
        part.unlink()
        fail("downloaded bytes do not match the sha256; the partial file was removed, download again", json_out, code=1)
    part.replace(out)
    return ref.size
