"""What both command lines (`offsite-admin`, `offsite-client`) share: the consoles, the
``--json`` option, failure printing and the server connection options.

One spelling everywhere: a command takes ``json_out: bool = JsonOption`` and fails with
``fail(message, json_out, code)``: one line on stderr (``error: ...``), or with ``--json`` one
``{"ok": false, "error": ...}`` object on stdout so scripts keep parsing, then exit ``code``.
Exit codes: 1 = the thing checked is bad (verification failed, the server said no),
2 = the command line or an input is wrong, 3 = a gate blocked, 130 = interrupted.
"""

from __future__ import annotations

import errno
import json
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

console = Console()
# Progress bars and errors go to stderr so `--json` output on stdout stays parseable.
err_console = Console(stderr=True)


def json_option(help: str = "print machine-readable JSON") -> Any:
    """The ``--json`` flag; the parameter is always spelled ``json_out``."""
    return typer.Option(False, "--json", help=help)


JsonOption: Any = json_option()


def fail(message: str, json_out: bool = False, code: int = 2) -> NoReturn:
    """Print one error line that names the problem and the fix, then exit with ``code``."""
    if json_out:
        typer.echo(json.dumps({"ok": False, "error": message}))
    else:
        # escape: a message quoting user input ("[0, 1]", "--x [y]") must print as written
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class OffsiteGroup(TyperGroup):
    """The root group of both CLIs (``typer.Typer(cls=OffsiteGroup)``): a file problem no command
    caught (a missing input, an unwritable output, a file that is not UTF-8 text) ends in one
    ``error:`` line and exit 2 (an input is wrong), never a traceback. The bad-input suite of
    tests/reliability walks every command through it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            fail(os_error_message(e), _json_requested(ctx), 2)
        except UnicodeDecodeError as e:
            fail(
                f"an input file is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8, "
                "e.g. `iconv -t utf-8 FILE`",
                _json_requested(ctx),
                2,
            )


def _json_requested(ctx: click.Context) -> bool:
    words = [*getattr(ctx, "_protected_args", []), *ctx.args]
    return "--json" in words


def os_error_message(e: OSError) -> str:
    where = e.filename or "a file"
    hint = {
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "it is in the way; pick another path or remove it",
        errno.EISDIR: "it is a folder; give a file",
        errno.EACCES: "you may not read or write there",
        errno.ENOSPC: "the disk is full; free space",
        errno.EROFS: "the file system is read-only",
    }
    return f"{where}: {e.strerror or e}; {hint.get(e.errno, 'check the path and its permissions')}"


def emit_json(data: Any, indent: int | None = 2) -> None:
    """Print one JSON document on stdout (paths, datetimes and the like as strings)."""
    typer.echo(json.dumps(data, indent=indent, default=str))


def int_list(text: str | None, what: str) -> list[int]:
    """'2,2' -> [2, 2]; empty -> []; anything else is a usage error naming the option."""
    try:
        return [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, e.g. 2,2; got {text!r}") from None


# The server connection, one spelling for both CLIs (flags and environment variables).
def server_option(default: Any = None, help: str = "server address HOST:PORT") -> Any:
    return typer.Option(default, "--server", envvar="OFFSITE_SERVER", help=help)


def token_option(default: Any = None, help: str = "API token (ofs_...)") -> Any:
    return typer.Option(default, "--token", envvar="OFFSITE_TOKEN", help=help)


def ca_option(help: str = "the server's CA certificate: turns TLS on") -> Any:
    return typer.Option(None, "--ca", envvar="OFFSITE_CA", help=help)


def client_cert_option() -> Any:
    return typer.Option(
        None, "--client-cert", envvar="OFFSITE_CLIENT_CERT", help="your certificate, when the server wants mutual TLS"
    )


def client_key_option() -> Any:
    return typer.Option(None, "--client-key", envvar="OFFSITE_CLIENT_KEY", help="the key of --client-cert")
