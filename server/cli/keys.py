"""`offsite-admin keys ...`: the model owner's signing key (and, later, TLS material).

`init_keys` does the work and returns what it wrote, so other key material (a dev TLS CA
and server certificate) is one more step there and one more row in the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from offsite.cli import JsonOption, console, fail
from offsite.emulators.signing import SigningKeyError, generate_signing_key, public_key_fingerprint, load_public_key

app = typer.Typer(no_args_is_help=True, help="Create and manage the model owner's keys.")


@app.callback()
def _keys() -> None:
    """Create and manage the model owner's keys."""


def init_keys(directory: Path, force: bool = False) -> dict[str, str]:
    """Write the key material into `directory`; returns {what: path or fingerprint}."""
    key_path, pub_path = generate_signing_key(directory, force=force)
    return {
        "signing_key": str(key_path),
        "signing_pub": str(pub_path),
        "signing_fingerprint": public_key_fingerprint(load_public_key(pub_path)),
    }


@app.command("init")
def init(
    dir: Path = typer.Option(..., "--dir", help="directory for signing.key (mode 600) and signing.pub"),
    force: bool = typer.Option(False, "--force", help="overwrite existing keys (bundles signed with the old key stop verifying)"),
    json_out: bool = JsonOption,
    tls: bool = typer.Option(False, "--tls", help="also write a dev TLS CA and server/client certificates "
                             "(ca.pem, server.pem, server.key, client.pem, client.key) for `offsite-admin serve`"),
    tls_host: list[str] = typer.Option([], "--tls-host", help="host name or IP the server certificate covers "
                                       "(repeatable; default localhost, 127.0.0.1, ::1)"),
) -> None:
    """Create an Ed25519 signing key pair for bundles (and, with --tls, dev TLS certificates).

    Example: offsite-admin keys init --dir keys --tls
    """
    try:
        result = init_keys(dir, force=force)
        if tls:  # server team: TLS material beside the signing key (offsite.server.tls)
            from offsite.server.tls import DEFAULT_HOSTS, write_dev_pki

            result |= {k: str(v) for k, v in write_dev_pki(dir, tuple(tls_host) or DEFAULT_HOSTS, force=force).items()}
    except (SigningKeyError, FileExistsError) as e:
        fail(str(e), json_out)
    if json_out:
        typer.echo(json.dumps({"ok": True, **result}))
        return
    table = Table(title="keys written", show_header=False)
    for k, v in result.items():
        table.add_row(k, v)
    console.print(table)
    console.print("Keep signing.key secret; give signing.pub to data owners so they can verify bundles.")
