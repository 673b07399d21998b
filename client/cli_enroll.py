"""`offsite-client enroll` and `offsite-client fetch`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

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

from .fetch import FetchError, enroll as do_enroll, fetch_bundle, load_enrollment


def enroll(
    server: str = server_option(..., help="model owner's server HOST:PORT"),
    token: str = token_option(..., help="your data-owner token (ofs_...)"),
    job: str = typer.Option(..., "--job", help="job id the model owner gave you"),
    ca: Path = ca_option(),
    client_cert: Path = client_cert_option(),
    client_key: Path = client_key_option(),
    public_key: Path = typer.Option(
        None,
        "--public-key",
        help="pin the bundle signing key (signing.pub) you were given, "
        "or a directory of them (keys kept across rotations)",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="without TLS (--ca) or --public-key, accept the signing key as "
        "received (anyone on the network path could replace it; local tests only)",
    ),
    fetch: bool = typer.Option(False, "--fetch", help="download the bundle right away"),
    json_out: bool = JsonOption,
) -> None:
    """Enroll in a job: saves the job's bundle digest, signing key and federation settings.

    Example: offsite-client enroll --server models.example.org:50051 --token ofs_... --job job_1a2b3c4d5e6f --fetch
    """
    try:
        e = do_enroll(
            server,
            token,
            job,
            ca=str(ca) if ca else None,
            client_cert=str(client_cert) if client_cert else None,
            client_key=str(client_key) if client_key else None,
            public_key=public_key,
            insecure=insecure,
        )
    except FetchError as ex:
        fail(str(ex), json_out, code=1)
    if not json_out:
        console.print(
            f"enrolled as [bold]{e.data_owner}[/bold] in {e.job_id}: bundle {e.bundle_sha256[:16]}... "
            f"({e.bundle_size / 1e6:.1f} MB), signing key saved to {e.public_key_path}",
            highlight=False,
        )
    if fetch:
        _fetch(job, None, None, json_out, enrollment_json=True)
    elif json_out:
        emit_json({"ok": True, "enrollment": asdict(e)})


def _fetch(
    job: str | None, token: str | None, cache: Path | None, json_out: bool, enrollment_json: bool = False
) -> None:
    try:
        e, saved_token = load_enrollment(job)
        with Progress(
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=json_out,
        ) as bar:
            task = bar.add_task("bundle", total=e.bundle_size)
            result = fetch_bundle(
                e,
                token or saved_token,
                cache_dir=cache,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except FetchError as ex:
        fail(str(ex), json_out, code=1)
    if json_out:
        emit_json(
            {
                "ok": True,
                "job_id": e.job_id,
                "bundle": str(result.path),
                "sha256": result.sha256,
                "size": result.size,
                "downloaded": result.downloaded,
                "cached": result.cached,
                "resumes": result.resumes,
                "seconds": round(result.seconds, 3),
                "public_key": e.public_key_path,
            }
        )
    else:
        how = "already cached, nothing downloaded" if result.cached else f"downloaded {result.downloaded / 1e6:.1f} MB"
        console.print(f"bundle verified (sha256 + signature): {result.path} ({how})", highlight=False)


def fetch(
    job: str = typer.Option(None, "--job", help="job id (default: your most recent enrollment)"),
    token: str = token_option(help="default: the token saved at enrollment"),
    cache: Path = typer.Option(None, "--cache", help="bundle cache (default: $OFFSITE_CACHE/bundles)"),
    json_out: bool = JsonOption,
) -> None:
    """Download the enrolled job's bundle (resumable), check its sha256 and signature, cache it by digest.

    Example: offsite-client fetch --job job_1a2b3c4d5e6f
    """
    _fetch(job, token, cache, json_out)
