"""The registry's schema through Alembic, on SQLite and (when it can start) PostgreSQL.

- a fresh database ends at the head revision and matches registry/tables.py's models exactly (a
  column added to a model without a revision fails here);
- a database made before Alembic (today's schema, no alembic_version) upgrades in place with
  its rows intact; one missing columns gets them;
- bad input fails at start with a clear error and writes nothing: an unknown (newer)
  revision, a malformed URL, an unreachable server, also through `offsite-admin serve`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from offsite.server.migrations import head
from offsite.server.postgres import PostgresUnavailable, server_for_tests
from offsite.server.registry import Base, Registry, RegistryUnavailable


@pytest.fixture(scope="module")
def pg():
    try:
        server = server_for_tests()
    except PostgresUnavailable as e:
        if os.environ.get("OFFSITE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (OFFSITE_REQUIRE_POSTGRES=1) but: {e}")
        server = None
        reason = str(e)
    yield server if server is not None else reason
    if server is not None:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path, pg):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    if isinstance(pg, str):
        pytest.skip(f"no PostgreSQL server: {pg}")
    return pg.create_database(f"m_{uuid.uuid4().hex[:12]}")


def _revision(url: str) -> str:
    engine = create_engine(url)
    with engine.connect() as conn:
        rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    return rev


def test_fresh_database_is_at_head_and_matches_the_models(url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    reg = Registry(url)
    assert _revision(url) == head() and reg.schema_version() == 1
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    reg.close()
    assert diff == [], (
        f"registry/tables.py's models and the Alembic revisions disagree: {diff}; "
        'add a revision with `python -m offsite.server.schema_revision revision -m "..."`'
    )


def test_database_from_before_alembic_upgrades_in_place(url):
    # What the registry made before Alembic: create_all of today's models + schema_meta version 1.
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO schema_meta (key, value) VALUES ('version', '1')"))
        conn.execute(
            text(
                "INSERT INTO models (id, name, source, family, digest, num_layers, description, created_at) "
                "VALUES ('mdl_old', 'old', 'tiny-llama', 'llama', '', 8, '', CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()
    reg = Registry(url)
    assert _revision(url) == head()
    assert reg.get_model("old").id == "mdl_old" and reg.schema_version() == 1
    job = reg.add_job("j", "mdl_old", "", {"rounds": 1})
    assert reg.get_job(job.id).state == "created"
    reg.close()
    Registry(url).close()  # opening again is a no-op at head
    assert _revision(url) == head()


def test_servers_opening_a_fresh_database_together_migrate_once(url):
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            Registry(url).close()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and _revision(url) == head()


def test_sqlite_connections_get_the_engines_busy_timeout_back_after_migrating(tmp_path):
    # The migration waits longer for another process's migration; every later query must wait
    # only the engine's own timeout again (the pool hands the migrating connection back out).
    reg = Registry(f"sqlite:///{tmp_path}/registry.db")
    with reg.engine.connect() as conn:
        waits = {conn.exec_driver_sql("PRAGMA busy_timeout").scalar()}
    for _ in range(3):
        with reg.engine.connect() as conn:
            waits.add(conn.exec_driver_sql("PRAGMA busy_timeout").scalar())
    reg.close()
    assert waits == {10000}


def test_a_newer_schema_is_refused_and_nothing_is_written(url):
    Registry(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        conn.execute(text("DROP TABLE audit"))  # a table the migration would re-create if it ran
    engine.dispose()
    before = _fingerprint_without(url, "audit")
    with pytest.raises(RegistryUnavailable) as e:
        Registry(url)
    msg = str(e.value)
    assert "9999_from_the_future" in msg and "newer offsite" in msg and "nothing was changed" in msg
    assert _fingerprint_without(url, "audit") == before


def _fingerprint_without(url: str, missing: str) -> str:
    engine = create_engine(url)
    with engine.connect() as conn:
        names = sorted(conn.dialect.get_table_names(conn))
        rows = {t: sorted(map(repr, conn.execute(text(f"SELECT * FROM {t}")).all())) for t in names}
    engine.dispose()
    assert missing not in names
    return hashlib.sha256(repr(rows).encode()).hexdigest()


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("not a url", "is not usable"),
        ("postgresql+nosuchdriver://u@127.0.0.1/x", "is not usable"),
        ("postgresql+psycopg://offsite:secret-pw@127.0.0.1:1/registry", "cannot open the registry database"),
    ],
)
def test_bad_database_urls_get_a_clear_error(bad, says):
    with pytest.raises(RegistryUnavailable) as e:
        Registry(bad)
    assert says in str(e.value)
    assert "secret-pw" not in str(e.value)  # credentials never reach a log


def test_serve_refuses_a_bad_database_and_writes_nothing(tmp_path):
    data = tmp_path / "srv"
    exe = Path(sys.executable).parent / "offsite-admin"
    proc = subprocess.run(
        [
            str(exe),
            "serve",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--database-url",
            "postgresql+psycopg://offsite:pw@127.0.0.1:1/registry",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert "cannot open the registry database" in said and "Traceback" not in said
    written = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    assert written == []


def test_the_url_other_parties_see_has_no_password():
    from offsite.server.registry import url_without_password

    assert url_without_password("postgresql+psycopg://u:p%40ss@db:5432/reg") == "postgresql+psycopg://u@db:5432/reg"
    assert url_without_password("sqlite:////srv/registry.db") == "sqlite:////srv/registry.db"
