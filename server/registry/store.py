"""The registry's engine and sessions: opening (and migrating) the database, short
transactions, and the helpers every table's methods share.

Every method opens its own short session and returns detached rows
(``expire_on_commit=False``), so callers on any thread can read their attributes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .errors import NotFound, RegistryUnavailable
from .tables import Base, JobEventRow, JobRow, SchemaMeta


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part
        return url.split("@")[-1]


def url_without_password(url: str) -> str:
    """`url` minus its password, for places other parties can read (a Flower run config reaches
    every SuperNode). The process that connects gets the password from libpq's environment
    (PGPASSWORD / PGPASSFILE), e.g. the SuperExec's."""
    parsed = make_url(url)
    return parsed._replace(password=None).render_as_string(hide_password=False) if parsed.password else url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=10000")
    # WAL lets readers run beside a writer; FULL sync so an acknowledged write survives a crash.
    # Switching a fresh file to WAL needs it to itself, and SQLite answers "locked" at once
    # (no busy wait) when another connection opens the same fresh file at that moment: retry.
    for attempt in range(100):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.05)
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Store:
    """The database behind a Registry. `url` is any SQLAlchemy database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        shown = _redacted(url)
        try:
            self.engine = make_engine(url)
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise RegistryUnavailable(
                f"database URL {shown!r} is not usable ({e}); expected e.g. "
                "postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME or sqlite:////path/registry.db"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        from ..migrations import SchemaTooNew

        try:
            self.migrate()
        except SchemaTooNew as e:
            self.engine.dispose()
            raise RegistryUnavailable(f"registry {shown}: {e}") from None
        except OperationalError as e:
            self.engine.dispose()
            reason = str(e.orig if e.orig is not None else e).strip().splitlines()[0]
            raise RegistryUnavailable(
                f"cannot open the registry database {shown}: {reason}; check the host, port, user, "
                "password and database name, and that the database server runs"
            ) from None

    @classmethod
    def for_data_dir(cls, data_dir) -> Store:
        return cls(f"sqlite:///{data_dir}/registry.db")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    # ---- schema -------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the database to the newest Alembic revision (offsite.server.migrations)."""
        from ..migrations import upgrade

        upgrade(self.engine, Base.metadata)

    def schema_version(self) -> int:
        with self.session() as s:
            return int(s.get(SchemaMeta, "version").value)

    # ---- generic helpers ------------------------------------------------------------------
    def _get(self, cls, key, what: str):
        with self.session() as s:
            row = s.get(cls, key)
            if row is None:
                raise NotFound(f"no {what} with id {key!r}; list them to see the ids")
            return row

    def _list(self, stmt, limit: int | None) -> list:
        if limit:
            stmt = stmt.limit(limit)
        with self.session() as s:
            return list(s.scalars(stmt))

    # ---- the job event log (jobs, releases and token revocations append to it) ----------
    def _event(self, s: Session, job_id: str, kind: str, data: dict) -> JobEventRow:
        # Serialise through JSON so non-JSON values fail here, not in a watcher.
        data = json.loads(json.dumps(data, default=str))
        # Lock the job row: two servers sharing a PostgreSQL registry append in turn (seq stays unique).
        s.execute(select(JobRow.id).where(JobRow.id == job_id).with_for_update())
        last = s.scalar(select(func.max(JobEventRow.seq)).where(JobEventRow.job_id == job_id)) or 0
        row = JobEventRow(job_id=job_id, seq=last + 1, kind=kind, data=data)
        s.add(row)
        s.flush()
        return row
