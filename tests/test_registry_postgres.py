"""The registry, token and server-flow suites again, on a real PostgreSQL server.

The SQLite suites' test functions run unchanged here; only their fixtures (`reg`, `auth`,
`server`) are replaced by ones on PostgreSQL (each test gets a fresh database). The server
is OFFSITE_TEST_POSTGRES_URL's, or a throwaway one started with initdb + pg_ctl
(offsite.server.postgres). Where none can start the tests skip with the reason, except
under OFFSITE_REQUIRE_POSTGRES=1 (CI), where that is a failure.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import uuid
from pathlib import Path

import pytest

from offsite.server.postgres import PostgresUnavailable, server_for_tests

TESTS = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_pg_suite_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _adopt(module, fixture: str, skip: tuple[str, ...] = ()) -> None:
    """Make the module's tests that use `fixture` tests of this file (they get our fixture)."""
    for name, fn in vars(module).items():
        if (
            name.startswith("test_")
            and callable(fn)
            and fixture in inspect.signature(fn).parameters
            and name not in skip
        ):
            globals()[name] = fn


_SERVER: list = []  # the PostgreSQL server of this module, made on first use


def _postgres():
    if not _SERVER:
        try:
            _SERVER.append(server_for_tests())
        except PostgresUnavailable as e:
            if os.environ.get("OFFSITE_REQUIRE_POSTGRES") == "1":
                pytest.fail(f"PostgreSQL is required here (OFFSITE_REQUIRE_POSTGRES=1) but: {e}")
            pytest.skip(f"no PostgreSQL server: {e}")
    return _SERVER[0]


@pytest.fixture(scope="session")
def pg():
    yield _postgres()
    _SERVER.pop().stop()


@pytest.fixture
def pg_url(pg):
    return pg.create_database(f"t_{uuid.uuid4().hex[:12]}")


# ---- the registry suite -------------------------------------------------------------------------
registry_suite = _load(TESTS / "test_registry.py")
_adopt(registry_suite, "reg")


@pytest.fixture
def reg(pg_url):
    from offsite.server.registry import Registry

    r = Registry(pg_url)
    assert r.engine.dialect.name == "postgresql"
    yield r
    r.close()


# ---- tokens -----------------------------------------------------------------------------------
auth_suite = _load(TESTS / "test_auth_tokens.py")
_adopt(auth_suite, "auth", skip=("test_secret_is_stored_only_as_a_hash",))  # reads the SQLite file; see below


@pytest.fixture
def auth(pg_url):
    from offsite.server.auth import Authenticator
    from offsite.server.registry import Registry

    r = Registry(pg_url)
    yield Authenticator(r, cache_ttl_s=60)
    r.close()


def test_secret_is_stored_only_as_a_hash_in_postgres(auth):
    from sqlalchemy import text

    secret, row = auth.create_token("alice", "partner")
    with auth.registry.engine.connect() as conn:
        dump = " ".join(str(r) for r in conn.execute(text("SELECT * FROM tokens")))
    assert row.id in dump and secret not in dump


# ---- the server flow (build -> job -> enroll/fetch -> rounds -> release -> gate -> export) ------------
flow_suite = _load(TESTS / "e2e" / "test_server_flow.py")
_adopt(flow_suite, "server")


# ---- the authorization suite (roles, scopes, refusals, audit) through a real server ------------------
auth_e2e_suite = _load(TESTS / "e2e" / "test_server_auth.py")
_adopt(auth_e2e_suite, "world")
world = auth_e2e_suite.world  # its own fixture, building its server through the ServerConfig below


def _server_config_on_postgres(**kwargs):
    """ServerConfig for the adopted suites: every server gets a fresh PostgreSQL database."""
    from offsite.server.state import ServerConfig

    url = _postgres().create_database(f"srv_{uuid.uuid4().hex[:12]}")
    return ServerConfig(**{**kwargs, "database_url": url})


auth_e2e_suite.ServerConfig = _server_config_on_postgres


@pytest.fixture(scope="module")
def server(pg, tmp_path_factory):
    from offsite.server.app import ServerThread
    from offsite.server.state import ServerConfig
    from offsite.server.testing import tiny_bundle

    url = pg.create_database(f"flow_{uuid.uuid4().hex[:12]}")
    cfg = ServerConfig(
        data_dir=tmp_path_factory.mktemp("srv"),
        port=0,
        database_url=url,
        job_runner=flow_suite.fake_job_runner,
        eval_runner=flow_suite.fake_eval_runner,
        signing_key=tiny_bundle().signing_key,
    )
    s = ServerThread(cfg).start()
    assert s.server.state.registry.engine.dialect.name == "postgresql"
    yield s
    s.stop()
