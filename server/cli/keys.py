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
from offsite.emulators.keyring import KEYRING_DIR, rotate_signing_key, trusted_keys
from offsite.emulators.signing import (
    PUBLIC_KEY_NAME,
    SigningKeyError,
    generate_signing_key,
    key_id,
    load_public_key,
    public_key_fingerprint,
)

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
        "key_id": key_id(load_public_key(pub_path)),
    }


@app.command("init")
def init(
    dir: Path = typer.Option(..., "--dir", help="directory for signing.key (mode 600) and signing.pub"),
    force: bool = typer.Option(
        False, "--force", help="overwrite existing keys (bundles signed with the old key stop verifying)"
    ),
    json_out: bool = JsonOption,
    tls: bool = typer.Option(
        False,
        "--tls",
        help="also write a dev TLS CA and server/client certificates "
        "(ca.pem, server.pem, server.key, client.pem, client.key) for `offsite-admin serve`",
    ),
    tls_host: list[str] = typer.Option(
        [],
        "--tls-host",
        help="host name or IP the server certificate covers (repeatable; default localhost, 127.0.0.1, ::1)",
    ),
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


def _key_dir(dir: Path | None, data_dir: Path | None, json_out: bool) -> Path:
    if (dir is None) == (data_dir is None):
        fail("pass either --dir (a key directory from `keys init`) or --data-dir (a server's data dir)", json_out)
    return dir if dir is not None else data_dir / "keys"


@app.command("rotate")
def rotate(
    dir: Path = typer.Option(None, "--dir", help="the key directory holding signing.key and signing.pub"),
    data_dir: Path = typer.Option(None, "--data-dir", help="a server's data dir (its key is DATA_DIR/keys)"),
    json_out: bool = JsonOption,
) -> None:
    """Make a new signing key for new bundles; keep the old public keys in DIR/keyring/ so
    bundles signed before still verify (manifests name their key id). A running server signs
    its next bundle with the new key.

    Example: offsite-admin keys rotate --data-dir srv
    """
    key_dir = _key_dir(dir, data_dir, json_out)
    try:
        result = rotate_signing_key(key_dir)
    except SigningKeyError as e:
        fail(str(e), json_out)
    if json_out:
        typer.echo(json.dumps({"ok": True, **result}))
        return
    console.print(
        f"new signing key [bold]{result['key_id']}[/bold] (was {result['previous_key_id']}); "
        f"keyring: {', '.join(result['keyring'])}"
    )
    console.print(
        f"Give data owners the new {result['signing_pub']}; bundles signed by older keys keep verifying "
        f"with {key_dir / KEYRING_DIR}/."
    )


@app.command("list")
def list_(
    dir: Path = typer.Option(None, "--dir", help="the key directory holding signing.key and signing.pub"),
    data_dir: Path = typer.Option(None, "--data-dir", help="a server's data dir (its key is DATA_DIR/keys)"),
    json_out: bool = JsonOption,
) -> None:
    """List the signing key and the older public keys of a key directory, by key id.

    Example: offsite-admin keys list --dir keys --json
    """
    key_dir = _key_dir(dir, data_dir, json_out)
    try:
        current = key_id(load_public_key(key_dir / PUBLIC_KEY_NAME))
        ring = trusted_keys(key_dir)
    except SigningKeyError as e:
        fail(str(e), json_out)
    rows = [{"key_id": kid, "current": kid == current, "file": str(path)} for kid, (_, path) in sorted(ring.items())]
    if json_out:
        typer.echo(json.dumps({"ok": True, "key_id": current, "keys": rows}))
        return
    table = Table(title=f"signing keys in {key_dir}")
    for col in ("key id", "signs new bundles", "file"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key_id"], "yes" if r["current"] else "", r["file"])
    console.print(table)
