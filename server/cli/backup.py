"""`offsite-admin backup` and `offsite-admin restore` (the work is offsite.server.backup)."""

from __future__ import annotations

from pathlib import Path

import typer

from offsite.cli import JsonOption, emit_json, err_console, fail


def backup(
    data_dir: Path = typer.Option(..., "--data-dir", help="the server's data directory"),
    out: Path = typer.Option(..., "--out", help="a new directory for the backup (never overwritten)"),
    database_url: str = typer.Option(
        None,
        "--database-url",
        envvar="OFFSITE_DATABASE_URL",
        help="the server's registry (default: sqlite in DATA_DIR)",
    ),
    json_out: bool = JsonOption,
) -> None:
    """Back up the registry (one consistent snapshot, also while the server runs) and its artifacts.

    Example: offsite-admin backup --data-dir srv --out backups/2026-11-30
    """
    from ..backup import BackupError
    from ..backup import backup as run_backup
    from ..registry import RegistryUnavailable

    try:
        manifest = run_backup(data_dir, database_url, out)
    except (BackupError, RegistryUnavailable) as e:
        fail(str(e), json_out, code=1)
    if json_out:
        emit_json({"ok": True, "out": str(out), **manifest})
    else:
        size = sum(manifest["artifacts"].values())
        err_console.print(
            f"backup in {out}: {sum(manifest['rows'].values())} rows, {len(manifest['artifacts'])} artifacts "
            f"({size / 1e6:.1f} MB), schema {', '.join(manifest['revision'])}",
            highlight=False,
        )


def restore(
    source: Path = typer.Option(..., "--from", help="a directory `offsite-admin backup` wrote"),
    data_dir: Path = typer.Option(..., "--data-dir", help="a fresh data directory for the restored server"),
    database_url: str = typer.Option(
        None,
        "--database-url",
        envvar="OFFSITE_DATABASE_URL",
        help="a fresh, empty registry database (default: sqlite in DATA_DIR)",
    ),
    json_out: bool = JsonOption,
) -> None:
    """Restore a backup into a fresh data directory (and database); then `offsite-admin serve` it.

    Example: offsite-admin restore --from backups/2026-11-30 --data-dir srv2
    """
    from ..backup import BackupError
    from ..backup import restore as run_restore
    from ..registry import RegistryUnavailable

    try:
        manifest = run_restore(source, data_dir, database_url)
    except (BackupError, RegistryUnavailable) as e:
        fail(str(e), json_out, code=1)
    if json_out:
        emit_json({"ok": True, "data_dir": str(data_dir), **manifest})
    else:
        err_console.print(
            f"restored {sum(manifest['rows'].values())} rows and {len(manifest['artifacts'])} artifacts into "
            f"{data_dir}; start it with `offsite-admin serve --data-dir {data_dir}`",
            highlight=False,
        )
