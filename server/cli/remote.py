"""What every `offsite-admin` command that talks to a server shares: the connection (the global
``--server``, ``--token``, ``--ca`` options from `offsite.cli`), status-code errors turned into
one readable line, rich tables, and following an operation with a progress bar.
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
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offsite.cli import (
    JsonOption,
    ca_option,
    client_cert_option,
    client_key_option,
    console,
    emit_json,
    err_console,
    fail,
    server_option,
    token_option,
)
from offsite.protos.channel import DEFAULT_ADDRESS, open_channel
from offsite.protos.v1 import operations_pb2, operations_pb2_grpc

__all__ = [
    "CONNECTION",
    "JsonOption",
    "call",
    "console",
    "emit_json",
    "err_console",
    "fail",
    "finish_operation",
    "fmt_time",
    "follow_operation",
    "global_options",
    "parse_json_option",
    "show_message",
    "table",
    "to_dict",
]


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
                fail(
                    "no token: pass --token or set OFFSITE_TOKEN (the server wrote the first admin token to "
                    "DATA_DIR/admin.token)"
                )
            self._channel = open_channel(self.server, self.token, self.ca, self.client_cert, self.client_key)
        return self._channel


CONNECTION = Connection()


def global_options(
    server: str = server_option(DEFAULT_ADDRESS),
    token: str = token_option(),
    ca: Path = ca_option(),
    client_cert: Path = client_cert_option(),
    client_key: Path = client_key_option(),
) -> None:
    """Offsite model-owner tools. Server commands take --server/--token (or OFFSITE_SERVER/OFFSITE_TOKEN)."""
    CONNECTION.server, CONNECTION.token, CONNECTION.ca = server, token, ca
    CONNECTION.client_cert, CONNECTION.client_key = client_cert, client_key
    CONNECTION._channel = None


def call(fn: Callable[..., Any], request: Any, json_out: bool = False, **kwargs) -> Any:
    """Make an RPC; a gRPC error becomes one line naming the status and what to do."""
    try:
        return fn(request, **kwargs)
    except grpc.RpcError as e:
        code = e.code()
        details = e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = (
                f"cannot reach the server at {CONNECTION.server} ({details}); is `offsite-admin serve` running? "
                "Set --server or OFFSITE_SERVER (and --ca for TLS)"
            )
        fail(f"{code.name}: {details}", json_out, code=1)


def to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


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


def show_message(title: str, message, json_out: bool) -> None:
    if json_out:
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


def follow_operation(op: operations_pb2.Operation, json_out: bool) -> operations_pb2.Operation:
    """Watch an operation to its end with a progress bar (or silently with --json)."""
    stub = operations_pb2_grpc.OperationsStub(CONNECTION.channel())
    last = op
    try:
        if json_out or not sys.stderr.isatty():
            for update in stub.WatchOperation(operations_pb2.WatchOperationRequest(id=op.id)):
                last = update
        else:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=err_console,
            ) as bar:
                task = bar.add_task(op.kind, total=1.0)
                for last in stub.WatchOperation(operations_pb2.WatchOperationRequest(id=op.id)):
                    bar.update(task, completed=last.progress, description=f"{op.kind}: {last.message}"[:70])
    except grpc.RpcError as e:
        fail(
            f"{e.code().name}: {e.details()} (the operation {op.id} may still be running: "
            f"`offsite-admin ops get {op.id}`)",
            json_out,
            code=1,
        )
    except KeyboardInterrupt:
        fail(
            f"stopped following; operation {op.id} keeps running (`offsite-admin ops cancel {op.id}` stops it)", code=1
        )
    return last


def finish_operation(op: operations_pb2.Operation, wait: bool, json_out: bool) -> None:
    """Print the operation (after following it when `wait`); exit 1 when it failed."""
    if wait:
        op = follow_operation(op, json_out)
    summary = op_summary(op)
    if json_out:
        emit_json(summary)
    else:
        state = summary["state"]
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state, "cyan")
        console.print(
            f"operation [bold]{op.id}[/bold] ({op.kind}): [{colour}]{state}[/{colour}]"
            + (f" -> {op.resource}" if op.resource else "")
            + (f"\n  {op.error}" if op.error else ""),
            highlight=False,
        )
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
        fail(f"{what}: not valid JSON ({e}); pass a JSON object or @file.json")
    if not isinstance(data, dict):
        fail(f"{what}: expected a JSON object")
    return data
