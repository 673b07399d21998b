"""`offsite-admin serve`: run the model owner's gRPC server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import typer
from offsite.cli import err_console, fail

from ..hooks import DEFAULT_EVAL_RUNNER, DEFAULT_JOB_RUNNER, DEFAULT_RELEASE_EXPORTER


def serve(
    data_dir: Path = typer.Option(..., "--data-dir", help="registry, artifacts, keys and admin.token live here"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0 for every interface)"),
    port: int = typer.Option(50051, "--port", help="port to bind (0 = any free port; the chosen one is printed)"),
    tls_cert: Path = typer.Option(
        None, "--tls-cert", help="server certificate (PEM); `offsite-admin keys init --tls` makes one"
    ),
    tls_key: Path = typer.Option(None, "--tls-key", help="server private key (PEM)"),
    client_ca: Path = typer.Option(
        None, "--client-ca", help="require client certificates signed by this CA (mutual TLS)"
    ),
    database_url: str = typer.Option(
        None, "--database-url", envvar="OFFSITE_DATABASE_URL", help="SQLAlchemy URL (default: sqlite in DATA_DIR)"
    ),
    signing_key: Path = typer.Option(
        None, "--signing-key", help="bundle signing key (default: DATA_DIR/keys/signing.key, created)"
    ),
    federation_address: str = typer.Option(
        "", "--federation-address", help="where data owners join (told at enrollment)"
    ),
    job_runner: str = typer.Option(DEFAULT_JOB_RUNNER, "--job-runner", help="module:function that runs a job"),
    eval_runner: str = typer.Option(DEFAULT_EVAL_RUNNER, "--eval-runner", help="module:function that runs an eval"),
    release_exporter: str = typer.Option(
        DEFAULT_RELEASE_EXPORTER, "--release-exporter", help="module:function that writes a release's model directory"
    ),
    grace: float = typer.Option(10.0, "--grace", help="seconds running operations get to finish at shutdown"),
    workers: int = typer.Option(2, "--workers", help="operations (builds, evals, jobs) run at once"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log more"),
    metrics_address: str = typer.Option(
        "",
        "--metrics-address",
        envvar="OFFSITE_METRICS_ADDRESS",
        help="serve Prometheus metrics at HOST:PORT/metrics (off when empty)",
    ),
    log_format: str = typer.Option("text", "--log-format", help="text | json (one object per line, with request ids)"),
) -> None:
    """Run the gRPC server (health checking and reflection on) until Ctrl-C or SIGTERM.

    On first start it creates DATA_DIR/admin.token (mode 600) and says so.

    Example: offsite-admin serve --data-dir srv --port 50051
    """
    from ..app import OffsiteServer
    from ..state import ServerConfig

    from ..logs import FORMATS, configure

    if log_format not in FORMATS:
        fail(f"--log-format {log_format!r}: use one of {', '.join(FORMATS)}")
    configure(log_format, logging.INFO if verbose else logging.WARNING)
    if bool(tls_cert) != bool(tls_key):
        fail("pass both --tls-cert and --tls-key (or neither)")
    for p in (tls_cert, tls_key, client_ca):
        if p is not None and not p.is_file():
            fail(f"{p}: no such file")
    cfg = ServerConfig(
        data_dir=data_dir,
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        client_ca=client_ca,
        database_url=database_url,
        signing_key=signing_key,
        federation_address=federation_address,
        job_runner=job_runner,
        eval_runner=eval_runner,
        release_exporter=release_exporter,
        grace_s=grace,
        op_workers=workers,
        extra={"metrics_address": metrics_address} if metrics_address else {},
    )

    async def main() -> None:
        server = OffsiteServer(cfg)
        bound = await server.start()
        st = server.state
        if st.admin_token_path is not None:
            err_console.print(
                f"first start: wrote the admin token to [bold]{st.admin_token_path}[/bold] (mode 600); "
                f"use it with --token or OFFSITE_TOKEN=$(cat {st.admin_token_path})",
                highlight=False,
            )
        scheme = "TLS" + (" + client certificates" if client_ca else "") if tls_cert else "plaintext (no TLS)"
        # The exact line tests and scripts wait for; keep its shape.
        print(f"offsite server listening on {host}:{bound} ({scheme}); data in {st.data_dir}", flush=True)
        if server.metrics_port:
            err_console.print(
                f"Prometheus metrics on http://{metrics_address.rpartition(':')[0]}:{server.metrics_port}/metrics",
                highlight=False,
            )
        await server.serve_until_signal()
        if server.stuck_operations:
            # Their threads ignore cancellation and would keep the process alive; their state is
            # recorded (cancelled) and their child processes are terminated, so leave now.
            err_console.print(
                f"server stopped; {len(server.stuck_operations)} operation(s) did not stop in time "
                f"({', '.join(server.stuck_operations)}), exiting anyway"
            )
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(0)
        err_console.print("server stopped")

    try:
        asyncio.run(main())
    except (OSError, ValueError, FileNotFoundError) as e:
        fail(str(e), code=1)
