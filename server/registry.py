"""The model owner's registry: models, emulators, artifacts, jobs, rounds, releases, evals,
tokens, audit and operations, in SQL through SQLAlchemy 2.

SQLite (a file in the data directory) is the default; any SQLAlchemy URL selects another
engine (PostgreSQL: postgresql+psycopg://...). The schema is Alembic's
(offsite.server.migrations): opening a registry upgrades its database in place to the
newest revision. A new column here needs a revision too
(`python -m offsite.server.schema_revision revision -m "..."`); tests/test_registry_migrations.py
fails until the models and the revisions agree.

Every method opens its own short session and returns detached rows
(``expire_on_commit=False``), so callers on any thread can read their attributes.
Other teams add columns or methods here with small edits.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 1
RELEASE_STATUSES = ("pending-gate", "approved", "rejected", "released", "blocked")
JOB_STATES = ("created", "running", "completed", "failed", "cancelled")
OPERATION_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
ROLES = ("admin", "partner", "data-owner")


class NotFound(LookupError):
    """No row with that id; the message names what was looked up."""


class RegistryUnavailable(ValueError):
    """The registry database cannot be used (bad URL, unreachable, newer schema); nothing was written."""


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


class Conflict(ValueError):
    """The change contradicts the current state (duplicate name, wrong status, ...)."""


def utcnow() -> datetime:
    # Naive UTC: SQLite drops time zones, so every datetime in the registry is UTC by rule.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


class Base(DeclarativeBase):
    pass


class SchemaMeta(Base):
    __tablename__ = "schema_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    source: Mapped[str] = mapped_column(String(1024))
    family: Mapped[str] = mapped_column(String(32), default="")
    digest: Mapped[str] = mapped_column(String(64), default="")
    num_layers: Mapped[int] = mapped_column(Integer, default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ArtifactRow(Base):
    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32), default="blob")
    name: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EmulatorRow(Base):
    __tablename__ = "emulators"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(32), index=True)
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    manifest: Mapped[dict] = mapped_column(JSON, default=dict)
    operation_id: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    model_id: Mapped[str] = mapped_column(String(32), default="")
    emulator_id: Mapped[str] = mapped_column(String(32), default="")
    state: Mapped[str] = mapped_column(String(16), default="created")
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    release_id: Mapped[str] = mapped_column(String(32), default="")
    federation_address: Mapped[str] = mapped_column(String(256), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    operation_id: Mapped[str] = mapped_column(String(32), default="")
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EnrollmentRow(Base):
    __tablename__ = "enrollments"
    __table_args__ = (UniqueConstraint("job_id", "data_owner"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    data_owner: Mapped[str] = mapped_column(String(128), index=True)
    token_id: Mapped[str] = mapped_column(String(32), default="", index=True)  # the token that owns it
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # its token was revoked


class RoundRow(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    adapter_sha256: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class JobEventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ReleaseRow(Base):
    __tablename__ = "releases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), default="", index=True)
    model_id: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default="pending-gate")
    adapter_sha256: Mapped[str] = mapped_column(String(64), default="")
    export_sha256: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    gate_report_id: Mapped[str] = mapped_column(String(32), default="")
    gate_verdict: Mapped[str] = mapped_column(String(16), default="")
    decided_by: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    parent_ids: Mapped[list] = mapped_column(JSON, default=list)  # lineage: the releases merged into this one


class EvalReportRow(Base):
    __tablename__ = "eval_reports"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    candidate: Mapped[str] = mapped_column(String(256), default="")
    base: Mapped[str] = mapped_column(String(256), default="")
    release_id: Mapped[str] = mapped_column(String(32), default="", index=True)
    verdict: Mapped[str] = mapped_column(String(16), default="")
    categories: Mapped[list] = mapped_column(JSON, default=list)
    report_json_sha256: Mapped[str] = mapped_column(String(64), default="")
    report_html_sha256: Mapped[str] = mapped_column(String(64), default="")
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    schedule_id: Mapped[str] = mapped_column(String(32), default="", index=True)
    operation_id: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EvalScheduleRow(Base):
    __tablename__ = "eval_schedules"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    cron: Mapped[str] = mapped_column(String(128))
    candidate: Mapped[str] = mapped_column(String(256))
    base: Mapped[str] = mapped_column(String(256), default="")
    suites: Mapped[list] = mapped_column(JSON, default=list)
    limit: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_report_id: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class TokenRow(Base):
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    jobs: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AuditRow(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16), default="")
    method: Mapped[str] = mapped_column(String(128), default="")
    target: Mapped[str] = mapped_column(String(256), default="")
    outcome: Mapped[str] = mapped_column(String(32), default="ok")
    detail: Mapped[str] = mapped_column(Text, default="")


class OperationRow(Base):
    __tablename__ = "operations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    resource: Mapped[str] = mapped_column(String(128), default="")
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside a writer; FULL sync so an acknowledged write survives a crash.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Registry:
    """Typed access to the registry tables. `url` is any SQLAlchemy database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        shown = _redacted(url)
        try:
            self.engine = make_engine(url)
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise RegistryUnavailable(
                f"database URL {shown!r} is not usable ({e}); expected e.g. "
                "postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME or sqlite:////path/registry.db") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        from .migrations import SchemaTooNew

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
                "password and database name, and that the database server runs") from None

    @classmethod
    def for_data_dir(cls, data_dir) -> Registry:
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
        from .migrations import upgrade

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

    # ---- models ---------------------------------------------------------------------------
    def add_model(self, name: str, source: str, family: str = "", digest: str = "", num_layers: int = 0,
                  description: str = "") -> ModelRow:
        with self.session() as s:
            if s.scalar(select(ModelRow).where(ModelRow.name == name)) is not None:
                raise Conflict(f"a model named {name!r} is already registered; pick another name")
            row = ModelRow(id=new_id("mdl"), name=name, source=source, family=family, digest=digest,
                           num_layers=num_layers, description=description)
            s.add(row)
        return row

    def get_model(self, id_or_name: str) -> ModelRow:
        with self.session() as s:
            row = s.get(ModelRow, id_or_name) or s.scalar(select(ModelRow).where(ModelRow.name == id_or_name))
            if row is None:
                raise NotFound(f"no model {id_or_name!r}; `offsite-admin models list` shows the registered ones")
            return row

    def list_models(self, limit: int | None = None) -> list[ModelRow]:
        return self._list(select(ModelRow).order_by(ModelRow.created_at), limit)

    # ---- artifacts ------------------------------------------------------------------------
    def add_artifact(self, sha256: str, size: int, kind: str = "blob", name: str = "") -> ArtifactRow:
        with self.session() as s:
            row = s.get(ArtifactRow, sha256)
            if row is None:
                row = ArtifactRow(sha256=sha256, size=size, kind=kind, name=name)
                s.add(row)
            return row

    def get_artifact(self, sha256: str) -> ArtifactRow:
        return self._get(ArtifactRow, sha256, "artifact")

    def find_artifact(self, sha256: str) -> ArtifactRow | None:
        with self.session() as s:
            return s.get(ArtifactRow, sha256)

    # ---- emulators ------------------------------------------------------------------------
    def add_emulator(self, model_id: str, bundle_sha256: str, config: dict, manifest: dict,
                     operation_id: str = "") -> EmulatorRow:
        row = EmulatorRow(id=new_id("emu"), model_id=model_id, bundle_sha256=bundle_sha256, config=config,
                          manifest=manifest, operation_id=operation_id)
        with self.session() as s:
            s.add(row)
        return row

    def get_emulator(self, emulator_id: str) -> EmulatorRow:
        return self._get(EmulatorRow, emulator_id, "emulator")

    def list_emulators(self, model_id: str | None = None, limit: int | None = None) -> list[EmulatorRow]:
        stmt = select(EmulatorRow).order_by(EmulatorRow.created_at)
        if model_id:
            stmt = stmt.where(EmulatorRow.model_id == model_id)
        return self._list(stmt, limit)

    # ---- jobs, enrollments, rounds, events --------------------------------------------------
    def add_job(self, name: str, model_id: str, emulator_id: str, spec: dict, created_by: str = "",
                federation_address: str = "") -> JobRow:
        row = JobRow(id=new_id("job"), name=name, model_id=model_id, emulator_id=emulator_id, spec=spec,
                     created_by=created_by, federation_address=federation_address)
        with self.session() as s:
            s.add(row)
            self._event(s, row.id, "created", {"name": name, "emulator_id": emulator_id})
        return row

    def get_job(self, job_id: str) -> JobRow:
        return self._get(JobRow, job_id, "job")

    def list_jobs(self, state: str | None = None, job_ids: list[str] | None = None,
                  limit: int | None = None) -> list[JobRow]:
        stmt = select(JobRow).order_by(JobRow.created_at)
        if state:
            stmt = stmt.where(JobRow.state == state)
        if job_ids is not None:
            stmt = stmt.where(JobRow.id.in_(job_ids))
        return self._list(stmt, limit)

    def update_job(self, job_id: str, expect_state: tuple[str, ...] | None = None, **fields: Any) -> JobRow:
        """Set job fields; a state change is also appended to the job's events. With
        `expect_state`, only from one of those states (checked in the transaction)."""
        with self.session() as s:
            # FOR UPDATE: servers sharing one PostgreSQL registry check-and-set in turn (no double start).
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            if expect_state is not None and row.state not in expect_state:
                raise Conflict(f"job {job_id} is {row.state!r}; this needs one of {list(expect_state)}")
            old_state = row.state
            for k, v in fields.items():
                if not hasattr(JobRow, k):
                    raise AttributeError(f"jobs has no column {k!r}")
                setattr(row, k, v)
            row.updated_at = utcnow()
            if "state" in fields and fields["state"] != old_state:
                if fields["state"] not in JOB_STATES:
                    raise ValueError(f"job state {fields['state']!r} is not one of {JOB_STATES}")
                self._event(s, job_id, "state", {"from": old_state, "to": fields["state"], "error": row.error})
            return row

    def enroll(self, job_id: str, data_owner: str, token_id: str = "") -> tuple[EnrollmentRow, bool]:
        """Enroll a data owner under a token (idempotent). Returns (row, created).

        An enrollment belongs to the token that made it: another data-owner token with the same
        name cannot take it over while that token is live (Conflict); an enrollment made by an
        admin on a data owner's behalf, or one whose token was revoked, passes to the data
        owner's token when it enrolls."""
        with self.session() as s:
            existing = s.scalar(select(EnrollmentRow).where(EnrollmentRow.job_id == job_id,
                                                            EnrollmentRow.data_owner == data_owner))
            if existing is not None and existing.ended_at is None:
                if existing.token_id == token_id or not token_id:
                    return existing, False
                holder = s.get(TokenRow, existing.token_id) if existing.token_id else None
                mine = s.get(TokenRow, token_id)
                holder_live = holder is not None and holder.revoked_at is None
                if holder_live and holder.role == "data-owner":
                    if mine is not None and mine.role != "data-owner":
                        return existing, False  # an admin re-enrolling someone: nothing changes
                    raise Conflict(f"data owner {data_owner!r} is enrolled in job {job_id} with another token "
                                   f"({existing.token_id}); revoke that token first (offsite-admin tokens revoke)")
                if mine is not None and mine.role != "data-owner":
                    return existing, False
                existing.token_id = token_id
                return existing, False
            if existing is not None:  # ended by a revocation: a new token enrolls again
                existing.token_id, existing.ended_at, existing.created_at = token_id, None, utcnow()
                self._event(s, job_id, "enrolled", {"data_owner": data_owner})
                return existing, True
            row = EnrollmentRow(job_id=job_id, data_owner=data_owner, token_id=token_id)
            s.add(row)
            self._event(s, job_id, "enrolled", {"data_owner": data_owner})
            return row, True

    def enrolled_data_owners(self, job_id: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(EnrollmentRow.data_owner).where(EnrollmentRow.job_id == job_id,
                                                                         EnrollmentRow.ended_at.is_(None))
                                  .order_by(EnrollmentRow.id)))

    def jobs_of_data_owner(self, data_owner: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(EnrollmentRow.job_id).where(EnrollmentRow.data_owner == data_owner,
                                                                     EnrollmentRow.ended_at.is_(None))))

    def jobs_of_token(self, token_id: str) -> list[str]:
        """The jobs a token is enrolled in (its live enrollments)."""
        if not token_id:
            return []
        with self.session() as s:
            return list(s.scalars(select(EnrollmentRow.job_id).where(EnrollmentRow.token_id == token_id,
                                                                     EnrollmentRow.ended_at.is_(None))))

    def add_round(self, job_id: str, number: int, metrics: dict, adapter_sha256: str = "") -> RoundRow:
        """Record a completed round (the federation's job runner calls this every round).

        Also advances the job's current_round and appends a "round" event, in one transaction.
        """
        with self.session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise NotFound(f"no job with id {job_id!r}")
            row = s.scalar(select(RoundRow).where(RoundRow.job_id == job_id, RoundRow.number == number))
            if row is None:
                row = RoundRow(job_id=job_id, number=number)
                s.add(row)
            row.metrics = metrics
            row.adapter_sha256 = adapter_sha256
            job.current_round = max(job.current_round, number)
            job.updated_at = utcnow()
            self._event(s, job_id, "round", {"number": number, "metrics": metrics, "adapter_sha256": adapter_sha256})
            return row

    def list_rounds(self, job_id: str) -> list[RoundRow]:
        return self._list(select(RoundRow).where(RoundRow.job_id == job_id).order_by(RoundRow.number), None)

    def last_round(self, job_id: str) -> RoundRow | None:
        rounds = self.list_rounds(job_id)
        return rounds[-1] if rounds else None

    def add_job_event(self, job_id: str, kind: str, data: dict) -> JobEventRow:
        with self.session() as s:
            return self._event(s, job_id, kind, data)

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

    def job_events(self, job_id: str, after_seq: int = 0) -> list[JobEventRow]:
        stmt = (select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.seq > after_seq)
                .order_by(JobEventRow.seq))
        return self._list(stmt, None)

    # ---- releases -------------------------------------------------------------------------
    def create_release(self, job_id: str, model_id: str, adapter_sha256: str, metrics: dict | None = None,
                       status: str = "pending-gate", parents: list[str] | None = None) -> ReleaseRow:
        """A candidate release from a finished job, or merged from `parents` (status pending-gate until the gate decides)."""
        if status not in RELEASE_STATUSES:
            raise ValueError(f"release status {status!r} is not one of {RELEASE_STATUSES}")
        row = ReleaseRow(id=new_id("rel"), job_id=job_id, model_id=model_id, adapter_sha256=adapter_sha256,
                         metrics=metrics or {}, status=status, parent_ids=list(parents or []))
        with self.session() as s:
            s.add(row)
            if job_id and s.get(JobRow, job_id) is not None:
                s.get(JobRow, job_id).release_id = row.id
                self._event(s, job_id, "release", {"release_id": row.id, "status": status})
        return row

    def get_release(self, release_id: str) -> ReleaseRow:
        return self._get(ReleaseRow, release_id, "release")

    def list_releases(self, status: str | None = None, job_id: str | None = None,
                      limit: int | None = None) -> list[ReleaseRow]:
        stmt = select(ReleaseRow).order_by(ReleaseRow.created_at)
        if status:
            stmt = stmt.where(ReleaseRow.status == status)
        if job_id:
            stmt = stmt.where(ReleaseRow.job_id == job_id)
        return self._list(stmt, limit)

    def update_release(self, release_id: str, expect_status: tuple[str, ...] | None = None, **fields: Any) -> ReleaseRow:
        """Change a release; with `expect_status`, only from one of those statuses (checked in the transaction)."""
        if "status" in fields and fields["status"] not in RELEASE_STATUSES:
            raise ValueError(f"release status {fields['status']!r} is not one of {RELEASE_STATUSES}")
        with self.session() as s:
            row = s.get(ReleaseRow, release_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no release with id {release_id!r}")
            if expect_status is not None and row.status not in expect_status:
                raise Conflict(f"release {release_id} is {row.status!r}; this needs one of {list(expect_status)}")
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = utcnow()
            return row

    # ---- evals ----------------------------------------------------------------------------
    def add_eval_report(self, candidate: str, base: str, verdict: str, categories: list[dict],
                        report_json_sha256: str = "", report_html_sha256: str = "", summary: dict | None = None,
                        release_id: str = "", schedule_id: str = "", operation_id: str = "") -> EvalReportRow:
        row = EvalReportRow(id=new_id("rep"), candidate=candidate, base=base, verdict=verdict, categories=categories,
                            report_json_sha256=report_json_sha256, report_html_sha256=report_html_sha256,
                            summary=summary or {}, release_id=release_id, schedule_id=schedule_id,
                            operation_id=operation_id)
        with self.session() as s:
            s.add(row)
            if schedule_id and (sched := s.get(EvalScheduleRow, schedule_id)) is not None:
                sched.last_report_id = row.id
        return row

    def update_eval_report_summary(self, report_id: str, **fields: Any) -> EvalReportRow:
        """Merge `fields` into a report's summary (the gate records whether its verdict applied)."""
        with self.session() as s:
            row = s.get(EvalReportRow, report_id)
            if row is None:
                raise NotFound(f"no eval report with id {report_id!r}")
            row.summary = {**(row.summary or {}), **fields}
            return row

    def get_eval_report(self, report_id: str) -> EvalReportRow:
        return self._get(EvalReportRow, report_id, "eval report")

    def list_eval_reports(self, release_id: str | None = None, schedule_id: str | None = None,
                          limit: int | None = None) -> list[EvalReportRow]:
        stmt = select(EvalReportRow).order_by(EvalReportRow.created_at.desc())
        if release_id:
            stmt = stmt.where(EvalReportRow.release_id == release_id)
        if schedule_id:
            stmt = stmt.where(EvalReportRow.schedule_id == schedule_id)
        return self._list(stmt, limit)

    def add_eval_schedule(self, name: str, cron: str, candidate: str, base: str = "", suites: list[str] | None = None,
                          limit: int = 0, next_run_at: datetime | None = None) -> EvalScheduleRow:
        row = EvalScheduleRow(id=new_id("sch"), name=name, cron=cron, candidate=candidate, base=base,
                              suites=suites or [], limit=limit, next_run_at=next_run_at)
        with self.session() as s:
            s.add(row)
        return row

    def get_eval_schedule(self, schedule_id: str) -> EvalScheduleRow:
        return self._get(EvalScheduleRow, schedule_id, "eval schedule")

    def list_eval_schedules(self, enabled_only: bool = False, limit: int | None = None) -> list[EvalScheduleRow]:
        stmt = select(EvalScheduleRow).order_by(EvalScheduleRow.created_at)
        if enabled_only:
            stmt = stmt.where(EvalScheduleRow.enabled.is_(True))
        return self._list(stmt, limit)

    def due_eval_schedules(self, now: datetime | None = None) -> list[EvalScheduleRow]:
        """Enabled schedules whose next run is at or before `now` (the eval scheduler polls this)."""
        now = now or utcnow()
        stmt = select(EvalScheduleRow).where(EvalScheduleRow.enabled.is_(True), EvalScheduleRow.next_run_at <= now)
        return self._list(stmt, None)

    def update_eval_schedule(self, schedule_id: str, **fields: Any) -> EvalScheduleRow:
        with self.session() as s:
            row = s.get(EvalScheduleRow, schedule_id)
            if row is None:
                raise NotFound(f"no eval schedule with id {schedule_id!r}")
            for k, v in fields.items():
                setattr(row, k, v)
            return row

    def claim_eval_schedule(self, schedule_id: str, now: datetime, next_run_at: datetime) -> bool:
        """Move a due schedule to its next run, only if it is still due: of several servers
        sharing the registry exactly one gets True for a given run (a conditional UPDATE)."""
        with self.session() as s:
            result = s.execute(
                update(EvalScheduleRow)
                .where(EvalScheduleRow.id == schedule_id, EvalScheduleRow.enabled.is_(True),
                       EvalScheduleRow.next_run_at <= now)
                .values(next_run_at=next_run_at, last_run_at=now)
            )
            return result.rowcount == 1

    def delete_eval_schedule(self, schedule_id: str) -> None:
        with self.session() as s:
            row = s.get(EvalScheduleRow, schedule_id)
            if row is None:
                raise NotFound(f"no eval schedule with id {schedule_id!r}")
            s.delete(row)

    # ---- tokens and audit -------------------------------------------------------------------
    def add_token(self, name: str, role: str, secret_hash: str, jobs: list[str] | None = None,
                  expires_at: datetime | None = None) -> TokenRow:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        row = TokenRow(id=new_id("tok"), name=name, role=role, secret_hash=secret_hash, jobs=jobs or [],
                       expires_at=expires_at)
        with self.session() as s:
            s.add(row)
        return row

    def token_by_hash(self, secret_hash: str) -> TokenRow | None:
        with self.session() as s:
            return s.scalar(select(TokenRow).where(TokenRow.secret_hash == secret_hash))

    def get_token(self, token_id: str) -> TokenRow:
        return self._get(TokenRow, token_id, "token")

    def list_tokens(self, include_revoked: bool = False) -> list[TokenRow]:
        stmt = select(TokenRow).order_by(TokenRow.created_at)
        if not include_revoked:
            stmt = stmt.where(TokenRow.revoked_at.is_(None))
        return self._list(stmt, None)

    def revoke_token(self, token_id: str) -> TokenRow:
        with self.session() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                raise NotFound(f"no token with id {token_id!r}; `offsite-admin tokens list` shows the ids")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            # Revocation ends the token's enrollments: its data owner leaves those jobs.
            for e in s.scalars(select(EnrollmentRow).where(EnrollmentRow.token_id == token_id,
                                                           EnrollmentRow.ended_at.is_(None))):
                e.ended_at = row.revoked_at
                self._event(s, e.job_id, "unenrolled", {"data_owner": e.data_owner, "reason": "token revoked"})
            return row

    def count_tokens(self, role: str | None = None) -> int:
        with self.session() as s:
            stmt = select(func.count()).select_from(TokenRow)
            if role:
                stmt = stmt.where(TokenRow.role == role)
            return int(s.scalar(stmt))

    def audit(self, actor: str, role: str, method: str, target: str = "", outcome: str = "ok",
              detail: str = "") -> None:
        with self.session() as s:
            s.add(AuditRow(actor=actor, role=role, method=method, target=target[:256], outcome=outcome,
                           detail=detail))

    def list_audit(self, limit: int = 100, method: str | None = None) -> list[AuditRow]:
        stmt = select(AuditRow).order_by(AuditRow.id.desc())
        if method:
            stmt = stmt.where(AuditRow.method.contains(method))
        return self._list(stmt, limit)

    # ---- operations -------------------------------------------------------------------------
    def add_operation(self, kind: str, created_by: str = "") -> OperationRow:
        row = OperationRow(id=new_id("op"), kind=kind, created_by=created_by)
        with self.session() as s:
            s.add(row)
        return row

    def update_operation(self, op_id: str, **fields: Any) -> OperationRow:
        with self.session() as s:
            row = s.get(OperationRow, op_id)
            if row is None:
                raise NotFound(f"no operation with id {op_id!r}")
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = utcnow()
            return row

    def get_operation(self, op_id: str) -> OperationRow:
        return self._get(OperationRow, op_id, "operation")

    def list_operations(self, kind: str | None = None, states: tuple[str, ...] | None = None,
                        limit: int | None = None) -> list[OperationRow]:
        stmt = select(OperationRow).order_by(OperationRow.created_at.desc())
        if kind:
            stmt = stmt.where(OperationRow.kind == kind)
        if states:
            stmt = stmt.where(OperationRow.state.in_(states))
        return self._list(stmt, limit)
