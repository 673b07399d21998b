"""Backups of a model owner's server: a consistent registry snapshot plus the artifacts by digest.

`backup(data_dir, database_url, out)` writes, into a temporary directory renamed to `out`
only when complete:

- ``registry/<table>.jsonl``: every row of every table, read in one transaction (SQLite:
  one read snapshot; PostgreSQL: REPEATABLE READ), so the tables agree with each other even
  while the server keeps running;
- ``artifacts/<sha256>``: every artifact the snapshot lists, each checked against its digest;
- ``keys/`` and ``admin.token``: the bundle signing key pair and the first admin token (the
  backup is as secret as the data directory; it is made mode 700);
- ``manifest.json``: the schema revision, row counts and artifact sizes (written last).

`restore(backup, data_dir, database_url)` refuses a target registry that already has rows
or a backup from another schema revision, checks every artifact's digest while copying it
in, and inserts all rows in one transaction. The engines may differ (SQLite -> PostgreSQL).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from sqlalchemy import DateTime, func, select

FORMAT = "offsite-backup/1"
_CHUNK = 1 << 20


class BackupError(RuntimeError):
    """The backup cannot be made or restored; the message says why and what to do."""


def _default_url(data_dir: Path, database_url: str | None) -> str:
    return database_url or f"sqlite:///{Path(data_dir).resolve() / 'registry.db'}"


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot back up a {type(value).__name__}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def backup(data_dir: str | Path, database_url: str | None, out: str | Path) -> dict:
    from .artifacts import ArtifactStore
    from .migrations import current
    from .registry import ArtifactRow, Base, Registry

    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    if out.exists():
        raise BackupError(f"{out} already exists; pick a new --out directory (backups are never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    reg = Registry(_default_url(data_dir, database_url))
    store = ArtifactStore(data_dir / "artifacts")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "registry").mkdir()
        counts: dict[str, int] = {}
        with reg.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN")  # pysqlite would read each table in its own transaction
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            revision = current(conn)
            for table in Base.metadata.sorted_tables:
                with open(tmp / "registry" / f"{table.name}.jsonl", "w") as fh:
                    n = 0
                    for row in conn.execute(select(table)).mappings():
                        fh.write(json.dumps(dict(row), default=_json_default) + "\n")
                        n += 1
                counts[table.name] = n
            shas = list(conn.execute(select(ArtifactRow.sha256)).scalars())
            conn.rollback()
        (tmp / "artifacts").mkdir()
        artifacts = {}
        for sha in shas:
            src = store.path(sha)
            if not src.is_file():
                raise BackupError(
                    f"artifact {sha} is in the registry but not in {store.root}; the data directory "
                    "is damaged: restore it from an older backup, or remove the row"
                )
            shutil.copyfile(src, tmp / "artifacts" / sha)
            if _sha256_file(tmp / "artifacts" / sha) != sha:
                raise BackupError(f"artifact {sha} in {store.root} does not match its digest (corrupted on disk)")
            artifacts[sha] = (tmp / "artifacts" / sha).stat().st_size
        keys = data_dir / "keys"
        if keys.is_dir():
            shutil.copytree(keys, tmp / "keys")
            os.chmod(tmp / "keys", 0o700)
        if (data_dir / "admin.token").is_file():  # the registry keeps only its hash
            shutil.copy2(data_dir / "admin.token", tmp / "admin.token")
        manifest = {
            "format": FORMAT,
            "created_at": datetime.now().astimezone().isoformat(),
            "revision": list(revision),
            "engine": reg.engine.dialect.name,
            "rows": counts,
            "artifacts": artifacts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)
        return manifest
    finally:
        reg.close()
        shutil.rmtree(tmp, ignore_errors=True)


def restore(backup_dir: str | Path, data_dir: str | Path, database_url: str | None = None) -> dict:
    from .artifacts import ArtifactStore
    from .migrations import head
    from .registry import Base, Registry

    src, data_dir = Path(backup_dir).resolve(), Path(data_dir).resolve()
    manifest_path = src / "manifest.json"
    if not manifest_path.is_file():
        raise BackupError(f"{src} has no manifest.json: not a backup, or one that did not finish")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest["revision"] != [head()]:
        raise BackupError(
            f"{src} holds schema revision {manifest['revision']}, this offsite is at {head()}: restore "
            "with the offsite version that made it, then start this one (it upgrades in place)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    reg = Registry(_default_url(data_dir, database_url))
    try:
        with reg.engine.connect() as conn:
            busy = {
                t.name: conn.execute(select(func.count()).select_from(t)).scalar()
                for t in Base.metadata.sorted_tables
                if t.name != "schema_meta"
            }
        if any(busy.values()):
            raise BackupError(
                f"the target registry is not empty ({ {k: v for k, v in busy.items() if v} }); "
                "restore into a fresh --data-dir / database"
            )
        store = ArtifactStore(data_dir / "artifacts")
        for sha, size in manifest["artifacts"].items():
            path = src / "artifacts" / sha
            if not path.is_file() or path.stat().st_size != size:
                raise BackupError(f"artifact {sha} is missing or truncated in {src}; nothing was restored")
            if store.put_file(path) != sha:
                raise BackupError(f"artifact {sha} in {src} does not match its digest; nothing was restored")
        if (src / "keys").is_dir() and not (data_dir / "keys").exists():
            shutil.copytree(src / "keys", data_dir / "keys")
        if (src / "admin.token").is_file() and not (data_dir / "admin.token").exists():
            shutil.copy2(src / "admin.token", data_dir / "admin.token")
        with reg.engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                if table.name == "schema_meta":
                    continue  # the target's own (written by its migration)
                dates = {c.name for c in table.columns if isinstance(c.type, DateTime)}
                rows = []
                with open(src / "registry" / f"{table.name}.jsonl") as fh:
                    for line in fh:
                        row = json.loads(line)
                        for k in dates & row.keys():
                            row[k] = datetime.fromisoformat(row[k]) if row[k] else None
                        rows.append(row)
                if len(rows) != manifest["rows"][table.name]:
                    raise BackupError(
                        f"{table.name}.jsonl has {len(rows)} rows, the manifest says "
                        f"{manifest['rows'][table.name]}; nothing was restored"
                    )
                if rows:
                    conn.execute(table.insert(), rows)
            if conn.dialect.name == "postgresql":  # serial ids continue after the restored ones
                for table in Base.metadata.sorted_tables:
                    col = table.c.get("id")
                    if col is not None and col.autoincrement is True and col.type.python_type is int:
                        conn.exec_driver_sql(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                            f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"
                        )
        return manifest
    finally:
        reg.close()
