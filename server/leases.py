"""Which server process owns a running operation, when several share one database.

On PostgreSQL the process that runs an operation holds a session-level advisory lock named
after it, on a connection of its own, for as long as the work runs. The lock dies with the
process (or its connection), so another server can tell a live owner from a dead one
without heartbeats: `orphaned()` succeeds in taking the lock only when nobody holds it.
A server starting next to a live one therefore leaves that one's operations and jobs
alone, and only work whose owner is gone is marked failed.

On SQLite one server owns the database file, so everything left running at start is
orphaned (the behaviour before several servers could share a registry).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name` (e.g. "op:op_1a2b...")."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Leases:
    def __init__(self, url: str) -> None:
        self.shared = make_url(url).get_backend_name() == "postgresql"
        # Its own connections, outside the registry's pool: a lease holds one for as long as
        # its operation runs (queued ones included), which would otherwise starve the pool.
        self.engine = create_engine(url, poolclass=NullPool) if self.shared else None

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Hold `name` while the block runs (PostgreSQL; a no-op on SQLite)."""
        if not self.shared:
            yield
            return
        conn = self.engine.connect()
        try:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_key(name)})
            conn.commit()
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(name)})
                conn.commit()
            except Exception:  # noqa: BLE001 - a lost connection released the lock already
                log.debug("advisory unlock of %s failed", name, exc_info=True)
            conn.close()  # NullPool: the session, and any lock left on it, ends here

    def orphaned(self, name: str) -> bool:
        """True when no live process holds `name` (always True on SQLite)."""
        if not self.shared:
            return True
        with self.engine.connect() as conn:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(name)}).scalar()
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(name)})
            conn.commit()
            return bool(got)
