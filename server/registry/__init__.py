"""The model owner's registry: models, emulators, artifacts, jobs, rounds, releases, evals,
tokens, audit and operations, in SQL through SQLAlchemy 2.

SQLite (a file in the data directory) is the default; any SQLAlchemy URL selects another
engine (PostgreSQL: postgresql+psycopg://...). The schema is Alembic's
(offsite.server.migrations): opening a registry upgrades its database in place to the
newest revision. A new column (in tables.py) needs a revision too
(`python -m offsite.server.schema_revision revision -m "..."`); tests/test_registry_migrations.py
fails until the models and the revisions agree.

Every method opens its own short session and returns detached rows
(``expire_on_commit=False``), so callers on any thread can read their attributes.

One module per job: `tables` (the models), `store` (engine, sessions, migration), then the
methods by what they keep: `catalog` (models, artifacts, emulators), `jobs` (jobs, enrollments,
rounds, events), `releases` (releases, evals), `tokens` (tokens, audit), `operations`.
`Registry` is all of them; import everything from `offsite.server.registry`.
"""

from __future__ import annotations

from .catalog import Catalog
from .errors import Conflict, NotFound, RegistryUnavailable
from .jobs import Jobs
from .operations import Operations
from .releases import Releases
from .store import Store, _redacted, make_engine, url_without_password
from .tables import (
    JOB_STATES,
    OPERATION_STATES,
    RELEASE_STATUSES,
    ROLES,
    SCHEMA_VERSION,
    ArtifactRow,
    AuditRow,
    Base,
    EmulatorRow,
    EnrollmentRow,
    EvalReportRow,
    EvalScheduleRow,
    JobEventRow,
    JobRow,
    ModelRow,
    OperationRow,
    ReleaseRow,
    RoundRow,
    SchemaMeta,
    TokenRow,
    new_id,
    utcnow,
)
from .tokens import Tokens


class Registry(Catalog, Jobs, Releases, Tokens, Operations):
    """Typed access to the registry tables. `url` is any SQLAlchemy database URL."""


__all__ = [
    "JOB_STATES",
    "OPERATION_STATES",
    "RELEASE_STATUSES",
    "ROLES",
    "SCHEMA_VERSION",
    "ArtifactRow",
    "AuditRow",
    "Base",
    "Conflict",
    "EmulatorRow",
    "EnrollmentRow",
    "EvalReportRow",
    "EvalScheduleRow",
    "JobEventRow",
    "JobRow",
    "ModelRow",
    "NotFound",
    "OperationRow",
    "Registry",
    "RegistryUnavailable",
    "ReleaseRow",
    "RoundRow",
    "SchemaMeta",
    "Store",
    "TokenRow",
    "make_engine",
    "new_id",
    "url_without_password",
    "utcnow",
    "_redacted",  # tests check that a shown URL hides the password
]
