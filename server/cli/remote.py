"""What every `offsite-admin` command that talks to a server shares: the connection options
(``--server``, ``--token``, ``--ca``, also from OFFSITE_SERVER / OFFSITE_TOKEN / OFFSITE_CA),
status-code errors turned into one readable line, rich tables, ``--json`` output, and
following an operation with a progress bar.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offsite.protos.channel import DEFAULT_ADDRESS, open_channel
from offsite.protos.v1 import operations_pb2, operations_pb2_grpc

console = Console()
err_console = Console(stderr=True)


@dataclass
class Connection:
    server: str = DEFAULT_ADDRESS
    token: str | None = None
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    _channel: grpc.Channel | None = None

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            if not self.token:
                fail("no token: pass --token or set OFFSITE_TOKEN (the server wrote the first admin token to "
                     "DATA_DIR/admin.token)", code=2)
            self._channel = open_channel(self.server, self.token, self.ca, self.client_cert, self.client_key)
        return self._channel


CONNECTION = Connection()

JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")


def global_options(
    server: str = typer.Option(DEFAULT_ADDRESS, "--server", envvar="OFFSITE_SERVER", help="server address HOST:PORT"),
    token: str = typer.Option(None, "--token", envvar="OFFSITE_TOKEN", help="API token (ofs_...)"),
    ca: Path = typer.Option(None, "--ca", envvar="OFFSITE_CA", help="CA certificate: turns TLS on"),
    client_cert: Path = typer.Option(None, "--client-cert", envvar="OFFSITE_CLIENT_CERT", help="client certificate (mutual TLS)"),
    client_key: Path = typer.Option(None, "--client-key", envvar="OFFSITE_CLIENT_KEY", help="client key (mutual TLS)"),
) -> None:
    """Offsite model-owner tools. Server commands take --server/--token (or OFFSITE_SERVER/OFFSITE_TOKEN)."""
    CONNECTION.server, CONNECTION.token, CONNECTION.ca = server, token, ca
    CONNECTION.client_cert, CONNECTION.client_key = client_cert, client_key
    CONNECTION._channel = None


def fail(message: str, code: int = 1, as_json: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message}))
    else:
        err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def call(fn: Callable[..., Any], request: Any, as_json: bool = False, **kwargs) -> Any:
    """Make an RPC; a gRPC error becomes one line naming the status and what to do."""
    try:
        return fn(request, **kwargs)
    except grpc.RpcError as e:
        code = e.code()
        details = e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = (f"cannot reach the server at {CONNECTION.server} ({details}); is `offsite-admin serve` running? "
                       "Set --server or OFFSITE_SERVER (and --ca for TLS)")
        fail(f"{code.name}: {details}", as_json=as_json)


def to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def fmt_time(ts) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    return datetime.fromtimestamp(ts.seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    n = 0
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
        n += 1
    if n == 0:
        console.print(f"[dim]no {title}[/dim]")
    else:
        console.print(t)


def show_message(title: str, message, as_json: bool) -> None:
    if as_json:
        emit_json(to_dict(message))
        return
    t = Table(title=title, show_header=False)
    for key, value in to_dict(message).items():
        t.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(t)


OP_STATE_NAMES = {v: k.replace("OPERATION_STATE_", "").lower() for k, v in operations_pb2.OperationState.items()}


def op_summary(op: operations_pb2.Operation) -> dict:
    d = to_dict(op)
    d["state"] = OP_STATE_NAMES.get(op.state, str(op.state))
    return d


def follow_operation(op: operations_pb2.Operation, as_json: bool) -> operations_pb2.Operation:
    """Watch an operation to its end with a progress bar (or silently with --json)."""
    stub = operations_pb2_grpc.OperationsStub(CONNECTION.channel())
    last = op
    try:
        if as_json or not sys.stderr.isatty():
            for last in stub.WatchOperation(operations_pb2.WatchOperationRequest(id=op.id)):
                pass
        else:
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                          TimeElapsedColumn(), console=err_console) as bar:
                task = bar.add_task(op.kind, total=1.0)
                for last in stub.WatchOperation(operations_pb2.WatchOperationRequest(id=op.id)):
                    bar.update(task, completed=last.progress, description=f"{op.kind}: {last.message}"[:70])
    except grpc.RpcError as e:
        fail(f"{e.code().name}: {e.details()} (the operation {op.id} may still be running: "
             f"`offsite-admin ops get {op.id}`)", as_json=as_json)
    except KeyboardInterrupt:
        fail(f"stopped following; operation {op.id} keeps running (`offsite-admin ops cancel {op.id}` stops it)")
    return last


def finish_operation(op: operations_pb2.Operation, wait: bool, as_json: bool) -> None:
    """Print the operation (after following it when `wait`); exit 1 when it failed."""
    if wait:
        op = follow_operation(op, as_json)
    summary = op_summary(op)
    if as_json:
        emit_json(summary)
    else:
        state = summary["state"]
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state, "cyan")
        console.print(f"operation [bold]{op.id}[/bold] ({op.kind}): [{colour}]{state}[/{colour}]"
                      + (f" -> {op.resource}" if op.resource else "") + (f"\n  {op.error}" if op.error else ""),
                      highlight=False)
        if not wait:
            console.print(f"follow it with `offsite-admin ops watch {op.id}`")
    if wait and op.state in (operations_pb2.OPERATION_STATE_FAILED, operations_pb2.OPERATION_STATE_CANCELLED):
        raise typer.Exit(1)


def parse_json_option(value: str | None, what: str) -> dict:
    if not value:
        return {}
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{what}: not valid JSON ({e}); pass a JSON object or @file.json", code=2)
    if not isinstance(data, dict):
        fail(f"{what}: expected a JSON object", code=2)
    return data
