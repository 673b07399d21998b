"""`offsite-client enroll` and `offsite-client fetch`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from .fetch import FetchError, enroll as do_enroll, fetch_bundle, load_enrollment

console = Console()
err = Console(stderr=True)


def _fail(message: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message}))
    else:
        err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def enroll(
    server: str = typer.Option(..., "--server", envvar="OFFSITE_SERVER", help="model owner's server HOST:PORT"),
    token: str = typer.Option(..., "--token", envvar="OFFSITE_TOKEN", help="your data-owner token (ofs_...)"),
    job: str = typer.Option(..., "--job", help="job id the model owner gave you"),
    ca: Path = typer.Option(None, "--ca", envvar="OFFSITE_CA", help="the server's CA certificate (TLS)"),
    client_cert: Path = typer.Option(None, "--client-cert", help="your certificate, if the server wants mutual TLS"),
    client_key: Path = typer.Option(None, "--client-key"),
    public_key: Path = typer.Option(None, "--public-key", help="pin the bundle signing key (signing.pub) you were given"),
    fetch: bool = typer.Option(False, "--fetch", help="download the bundle right away"),
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Enroll in a job: saves the job's bundle digest, signing key and federation settings.

    Example: offsite-client enroll --server models.example.org:50051 --token ofs_... --job job_1a2b3c4d5e6f --fetch
    """
    try:
        e = do_enroll(server, token, job, ca=str(ca) if ca else None, client_cert=str(client_cert) if client_cert else None,
                      client_key=str(client_key) if client_key else None, public_key=public_key)
    except FetchError as ex:
        _fail(str(ex), json_out)
    if not json_out:
        console.print(f"enrolled as [bold]{e.data_owner}[/bold] in {e.job_id}: bundle {e.bundle_sha256[:16]}... "
                      f"({e.bundle_size / 1e6:.1f} MB), signing key saved to {e.public_key_path}", highlight=False)
    if fetch:
        _fetch(job, None, None, json_out, enrollment_json=True)
    elif json_out:
        from dataclasses import asdict

        typer.echo(json.dumps({"ok": True, "enrollment": asdict(e)}, indent=2))


def _fetch(job: str | None, token: str | None, cache: Path | None, json_out: bool, enrollment_json: bool = False) -> None:
    try:
        e, saved_token = load_enrollment(job)
        with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                      disable=json_out) as bar:
            task = bar.add_task("bundle", total=e.bundle_size)
            result = fetch_bundle(e, token or saved_token, cache_dir=cache,
                                  on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    except FetchError as ex:
        _fail(str(ex), json_out)
    if json_out:
        typer.echo(json.dumps({"ok": True, "job_id": e.job_id, "bundle": str(result.path), "sha256": result.sha256,
                               "size": result.size, "downloaded": result.downloaded, "cached": result.cached,
                               "resumes": result.resumes, "seconds": round(result.seconds, 3),
                               "public_key": e.public_key_path}, indent=2))
    else:
        how = "already cached, nothing downloaded" if result.cached else f"downloaded {result.downloaded / 1e6:.1f} MB"
        console.print(f"bundle verified (sha256 + signature): {result.path} ({how})", highlight=False)


def fetch(
    job: str = typer.Option(None, "--job", help="job id (default: your most recent enrollment)"),
    token: str = typer.Option(None, "--token", envvar="OFFSITE_TOKEN", help="default: the token saved at enrollment"),
    cache: Path = typer.Option(None, "--cache", help="bundle cache (default: $OFFSITE_CACHE/bundles)"),
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Download the enrolled job's bundle (resumable), check its sha256 and signature, cache it by digest.

    Example: offsite-client fetch --job job_1a2b3c4d5e6f
    """
    _fetch(job, token, cache, json_out)
