"""A throwaway PostgreSQL server: `initdb` + `pg_ctl` in a directory of its own.

For tests, CI and local trials of `offsite-admin serve --database-url postgresql+psycopg://...`.
It listens on 127.0.0.1 at a free port (and a Unix socket in its directory), trusts local
connections, and is removed by `stop()`. PostgreSQL refuses to run as root, so under root
the cluster belongs to the `postgres` system user (Debian's package creates it).

    with TempPostgres() as pg:
        url = pg.create_database("t1")      # postgresql+psycopg://postgres@127.0.0.1:PORT/t1
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why and what to install."""


def find_bin_dir() -> Path:
    """The directory holding initdb/pg_ctl/postgres (Debian keeps them off PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.insert(0, str(Path(os.path.realpath(on_path)).parent))
    for c in candidates:
        if all((Path(c) / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    raise PostgresUnavailable(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed; "
        "`apt-get install -y postgresql` (Debian) or set OFFSITE_TEST_POSTGRES_URL"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    def __init__(
        self,
        root: str | Path | None = None,
        port: int | None = None,
        listen: str = "127.0.0.1",
        wrap: list[str] | tuple[str, ...] = (),
        password: str | None = None,
    ) -> None:
        """`wrap`: a command prefix for every PostgreSQL program, e.g. `ip netns exec NS` to run
        the server on another (namespace) host. `password`: TCP connections to a non-loopback
        `listen` address must give it (scram-sha-256); loopback and the socket stay trusted."""
        self.bin = find_bin_dir()
        self.wrap = list(wrap)
        self.password = password
        self.root = Path(root or tempfile.mkdtemp(prefix="offsite-pg-"))
        self.data = self.root / "data"
        self.port = port or _free_port()
        self.listen = listen
        self.user = "postgres"
        self._run_as = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root and there is no `postgres` user to own the cluster "
                    "(PostgreSQL refuses root); install Debian's postgresql package"
                ) from None

    def _pg(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        def demote():
            if self._run_as is not None:
                os.setgid(self._run_as.pw_gid)
                os.setuid(self._run_as.pw_uid)

        env = dict(os.environ, LC_ALL="C", PGTZ="UTC")
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        preexec = demote
        if self.wrap:  # the wrapper (e.g. setns) needs root: drop to the cluster's owner after it
            cmd = [*self.wrap, *(["runuser", "-u", self.user, "--"] if self._run_as is not None else []), *cmd]
            preexec = None
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=preexec,
            env=env,
            cwd=self.root,
        )
        if proc.returncode != 0:
            raise PostgresUnavailable(
                f"`{' '.join(argv)}` failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}"
            )
        return proc

    def start(self) -> TempPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "--encoding=UTF8", "--no-sync")
        if self.listen not in ("127.0.0.1", "localhost"):
            # initdb trusts loopback only; the host's own address (its server connects from it) too.
            with open(self.data / "pg_hba.conf", "a") as fh:
                fh.write(f"host all all {self.listen}/32 {'scram-sha-256' if self.password else 'trust'}\n")
        opts = (
            f"-c listen_addresses={self.listen} -c port={self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off -c max_connections=200"
        )
        self._pg(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-o", opts, "-w", "-t", "60", "start"
        )
        if self.password:
            self._set_password()
        return self

    def _set_password(self) -> None:
        secret = self.password.replace("'", "''")
        self._pg(
            "psql",
            "-h",
            str(self.root),
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            "postgres",
            "-q",
            "-c",
            f"ALTER USER {self.user} PASSWORD '{secret}'",
        )

    def stop(self, remove: bool = True) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except PostgresUnavailable:
                pass
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", host: str | None = None) -> str:
        from urllib.parse import quote

        auth = f"{self.user}:{quote(self.password, safe='')}" if self.password else self.user
        return f"postgresql+psycopg://{auth}@{host or self.listen}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True
                ) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return self.url(name, "127.0.0.1")
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SharedPostgres:
    """Databases on an existing server (OFFSITE_TEST_POSTGRES_URL, e.g. one CI started)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.base = make_url(url)

    def create_database(self, name: str) -> str:
        import psycopg

        b = self.base
        with psycopg.connect(
            host=b.host,
            port=b.port or 5432,
            user=b.username,
            password=b.password,
            dbname=b.database or "postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return b.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)

    def stop(self) -> None:
        pass


def server_for_tests() -> TempPostgres | SharedPostgres:
    """OFFSITE_TEST_POSTGRES_URL's server, else a fresh TempPostgres (raises PostgresUnavailable)."""
    url = os.environ.get("OFFSITE_TEST_POSTGRES_URL")
    if url:
        return SharedPostgres(url)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PostgresUnavailable("the psycopg driver is not installed (pip install 'offsite[server]')") from None
    return TempPostgres().start()


def main() -> None:
    """`python -m offsite.server.postgres start|stop --dir DIR` (CI: one server for the whole run).

    `start` prints `export OFFSITE_TEST_POSTGRES_URL=...` for a shell to eval."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m offsite.server.postgres", description=main.__doc__)
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--dir", required=True, type=Path)
    args = ap.parse_args()
    if args.action == "start":
        try:
            pg = TempPostgres(root=args.dir).start()
        except PostgresUnavailable as e:
            raise SystemExit(f"error: {e}") from None
        (args.dir / "url").write_text(pg.url("postgres"))
        print(f"export OFFSITE_TEST_POSTGRES_URL={pg.url('postgres')}")
    else:
        TempPostgres(root=args.dir, port=1).stop()  # pg_ctl finds the server by its data directory


if __name__ == "__main__":
    main()
