"""The Offsite federation across namespace hosts: a model owner and N data owners.

    python deploy/netns/federation.py --dir STATE [--owners 3] [--rounds 1] [--keep]   # as root

On the model owner's host (10.77.0.1) it starts the SuperLink (TLS with a certificate for
10.77.0.1 and 127.0.0.1, SuperNode authentication, process isolation) on 127.0.0.1:9093, the
Fleet proxy (offsite.server.fleet_proxy) on 10.77.0.1:9092 passing data owners the Fleet API
only, the SuperExec (its gRPC health port open on every interface, closed to other hosts by
the firewall) and `offsite-admin serve` (TLS, the same certificate), then opens only the
proxy's and the API's ports to the data owners (nftables). The model owner registers a tiny model, builds a
bundle and creates a deployment job with the `offsite-admin` CLI. Each data owner
(10.77.0.11, ...) has its own client home, cache and node key and runs `offsite-client
enroll`, `fetch` and `join --print-key` (the model owner registers that key with `flwr
supernode register`), then `join`. `offsite-admin jobs start --wait` runs the job to a
pending-gate release. Everything it runs is the shipped CLIs; logs go to STATE/logs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import Host, Network, check_available  # noqa: E402

SUPERLINK_PORT = 9092  # public: the Fleet API only, through offsite.server.fleet_proxy
SUPERLINK_PRIVATE_PORT = 9093  # the SuperLink itself (Fleet + Control + Runtime APIs), on 127.0.0.1
API_PORT = 50051  # offsite-admin serve: data owners enroll and fetch here
SUPEREXEC_HEALTH_PORT = 9095  # the SuperExec's health server: the model owner's own
REGISTRY_PORT = 5432  # PostgreSQL (the registry), on the model owner's host: the model owner's own
NODE_PORT = 9094  # each SuperNode's local runtime API (loopback of its own host)
BIN = Path(sys.executable).parent
TINY_TRAIN = {"local_steps": 2, "batch_size": 2, "block_size": 128}
TINY_OPTIONS = {"heldout_limit": 2, "round_timeout": 240}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(extra)
    return env


class StepFailed(RuntimeError):
    """A CLI step failed; the message holds its command and output."""


@dataclass
class Site:
    """One host's processes, state directory and environment."""

    host: Host
    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            self.host.cmd(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def call(self, argv: list[str], timeout: float = 300) -> dict:
        """Run a CLI with --json in this host's namespace; its JSON output, or StepFailed."""
        proc = self.host.run(argv, env=self.env, timeout=timeout)
        if proc.returncode != 0:
            raise StepFailed(
                f"{self.host.role}: `{' '.join(argv)}` failed ({proc.returncode}):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        out = proc.stdout.strip()
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return json.loads(out.splitlines()[-1])  # a progress line before the JSON

    def wait_port(self, port: int, address: str | None = None, timeout: float = 120, proc: str = "") -> None:
        """Wait until address:port accepts connections; fail at once if process `proc` died."""
        probe = (
            "import socket,sys,time\n"
            "end=time.monotonic()+3\n"
            "while time.monotonic()<end:\n"
            "    s=socket.socket(); s.settimeout(1)\n"
            "    if s.connect_ex((sys.argv[1],int(sys.argv[2])))==0: sys.exit(0)\n"
            "    s.close(); time.sleep(0.3)\n"
            "sys.exit(1)\n"
        )
        address = address or self.host.address
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.host.run([sys.executable, "-c", probe, address, str(port)], timeout=30).returncode == 0:
                return
            if proc and self.procs[proc].poll() is not None:
                raise StepFailed(
                    f"{self.host.role}: {proc} exited ({self.procs[proc].returncode}) before listening "
                    f"on {address}:{port}:\n{self.log(proc)[-3000:]}"
                )
        raise StepFailed(
            f"nothing listens on {address}:{port} in {self.host.role} after {timeout:.0f}s; see {self.root / 'logs'}"
        )

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@dataclass
class Federation:
    net: Network
    state: Path
    model_owner: Site | None = None
    owners: dict[str, Site] = field(default_factory=dict)
    ca: Path | None = None
    signing_pub: Path | None = None

    @property
    def superlink(self) -> str:
        return f"{self.net.server.address}:{SUPERLINK_PORT}"

    @property
    def api(self) -> str:
        return f"{self.net.server.address}:{API_PORT}"

    # --- the model owner ------------------------------------------------------------------
    def start_registry(self) -> str:
        """PostgreSQL on the model owner's host, listening on its address with a password (the
        firewall keeps data owners out); returns the server's --database-url. The model owner's
        processes also get the password as PGPASSWORD: the SuperExec's ServerApps connect with
        it, since the run config (which every SuperNode sees) carries the URL without it."""
        import secrets

        from offsite.server.postgres import TempPostgres

        address = self.net.server.address
        self.db_password = secrets.token_urlsafe(16)
        self.postgres = TempPostgres(
            port=REGISTRY_PORT, listen=address, wrap=self.net.server.cmd([]), password=self.db_password
        ).start()
        return self.postgres.url("postgres", address)

    def start_model_owner(self, database_url: str = "") -> Site:
        from offsite.server.federation.deployment import (
            make_secret,
            make_tls,
            superexec_command,
            superlink_command,
            write_flwr_home,
        )

        root = self.state / "model-owner"
        data = root / "srv"
        data.mkdir(parents=True, exist_ok=True)
        address = self.net.server.address
        # The host's address (what data owners see), and loopback for the private SuperLink port.
        tls = make_tls(root / "tls", hosts=(address, "127.0.0.1"))
        self.ca = tls.ca_cert
        secret = make_secret(root / "superexec.secret")
        private = f"127.0.0.1:{SUPERLINK_PRIVATE_PORT}"  # the model owner's own flwr CLI and SuperExec
        flwr_home = write_flwr_home(data / "flwr-home", "offsite", private, tls.ca_cert)
        site = Site(
            self.net.server, root, _env(FLWR_HOME=str(flwr_home), OFFSITE_SERVER=self.api, OFFSITE_CA=str(tls.ca_cert))
        )
        if getattr(self, "db_password", ""):
            site.env["PGPASSWORD"] = self.db_password
        self.model_owner = site
        self.net.firewall([SUPERLINK_PORT, API_PORT])
        site.spawn("superlink", superlink_command(root, tls, secret, host="127.0.0.1", port=SUPERLINK_PRIVATE_PORT))
        site.wait_port(SUPERLINK_PRIVATE_PORT, "127.0.0.1", proc="superlink")
        # Data owners get the Fleet API only: the Control API shares the SuperLink's port.
        proxy = [sys.executable, "-m", "offsite.server.fleet_proxy", "--listen", self.superlink, "--upstream", private]
        site.spawn(
            "fleet-proxy",
            proxy + ["--ca", str(tls.ca_cert), "--cert", str(tls.server_cert), "--key", str(tls.server_key)],
        )
        site.spawn(
            "superexec",
            superexec_command(private, tls, secret) + ["--health-server-address", f"0.0.0.0:{SUPEREXEC_HEALTH_PORT}"],
        )
        serve = [
            str(BIN / "offsite-admin"),
            "serve",
            "--data-dir",
            str(data),
            "--host",
            address,
            "--port",
            str(API_PORT),
            "--tls-cert",
            str(tls.server_cert),
            "--tls-key",
            str(tls.server_key),
            "--federation-address",
            self.superlink,
        ]
        if database_url:
            serve += ["--database-url", database_url]
        site.spawn("server", serve)
        site.wait_port(API_PORT, proc="server")
        site.wait_port(SUPERLINK_PORT, proc="fleet-proxy")
        site.wait_port(SUPEREXEC_HEALTH_PORT, "127.0.0.1", proc="superexec")
        site.env["OFFSITE_TOKEN"] = (data / "admin.token").read_text().strip()
        self.signing_pub = data / "keys" / "signing.pub"
        return site

    def admin(self, *args: str, timeout: float = 600) -> dict:
        return self.model_owner.call([str(BIN / "offsite-admin"), *args, "--json"], timeout=timeout)

    def register_node(self, public_key: Path) -> None:
        self.model_owner.call(
            [str(BIN / "flwr"), "supernode", "register", str(public_key), "offsite", "--format", "json"], timeout=120
        )

    def create_job(self, clients: int, rounds: int = 1) -> tuple[str, dict[str, str]]:
        """A tiny model, its bundle, a deployment job, and one data-owner token per owner."""
        self.admin("models", "register", "tiny", "--source", "tiny-llama")
        built = self.admin("bundles", "build", "--model", "tiny", "--wait")
        emulator = _find(built, "emu_")
        job = self.admin(
            "jobs",
            "create",
            "--emulator",
            emulator,
            "--rounds",
            str(rounds),
            "--min-clients",
            str(clients),
            "--engine",
            "deployment",
            "--train-config",
            json.dumps(TINY_TRAIN),
            "--options",
            json.dumps(TINY_OPTIONS),
        )
        job_id = job["id"]
        from concurrent.futures import ThreadPoolExecutor

        def token(role: str) -> tuple[str, str]:
            return role, self.admin("tokens", "create", "--role", "data-owner", "--name", role, "--job", job_id)[
                "secret"
            ]

        with ThreadPoolExecutor(max(1, len(self.owners))) as pool:  # independent calls: overlap their start-up
            return job_id, dict(pool.map(token, list(self.owners)))

    # --- the data owners --------------------------------------------------------------------
    def add_owner(self, role: str) -> Site:
        root = self.state / role
        root.mkdir(parents=True, exist_ok=True)
        site = Site(
            self.net.hosts[role],
            root,
            _env(OFFSITE_CLIENT_HOME=str(root / "home"), OFFSITE_CACHE=str(root / "cache"), HOME=str(root)),
        )
        self.owners[role] = site
        return site

    def enroll_and_fetch(self, role: str, token: str, job_id: str) -> dict:
        site = self.owners[role]
        client = str(BIN / "offsite-client")
        site.call(
            [client, "enroll", "--server", self.api, "--token", token, "--job", job_id, "--ca", str(self.ca), "--json"]
        )
        return site.call([client, "fetch", "--job", job_id, "--json"])

    def join(self, role: str, job_id: str, data: str, register: bool = True, extra: list[str] = ()) -> Path:
        """Create the node key, have the model owner register it (unless not), start the SuperNode."""
        site = self.owners[role]
        base = [
            str(BIN / "offsite-client"),
            "join",
            "--job",
            job_id,
            "--data",
            data,
            "--root-cert",
            str(self.ca),
            "--node-key-dir",
            str(site.root / "node"),
            "--port",
            str(NODE_PORT),
            *extra,
        ]
        pub = Path(site.call(base + ["--print-key", "--json"])["public_key"])
        if register:
            self.register_node(pub)
        site.spawn("supernode", base)
        return pub

    def bring_owners_in(self, job_id: str, tokens: dict[str, str]) -> dict[str, dict]:
        """Every owner enrolls, fetches and joins (in parallel: they are separate hosts)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(i_role):
            i, role = i_role
            fetched = self.enroll_and_fetch(role, tokens[role], job_id)
            self.join(role, job_id, f"python-reference:{i}/{len(tokens)}")
            return role, fetched

        with ThreadPoolExecutor(len(tokens)) as pool:
            return dict(pool.map(one, enumerate(tokens)))

    def stop(self) -> None:
        for site in [*self.owners.values(), self.model_owner]:
            if site is not None:
                site.stop()
        if getattr(self, "postgres", None) is not None:
            self.postgres.stop()


def _find(obj, prefix: str) -> str:
    """The first id like `prefix` + hex in a JSON answer (e.g. emu_... inside "emulators/emu_...")."""
    match = re.search(rf"\b{prefix}[0-9a-f]+\b", json.dumps(obj))
    if match is None:
        raise StepFailed(f"no {prefix}... id in {json.dumps(obj)[:500]}")
    return match.group(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--owners", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="the registry on PostgreSQL on the model owner's host (default: SQLite in the server's data dir)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the hosts running until Ctrl-C")
    args = ap.parse_args()
    check_available()
    roles = [f"owner-{i + 1}" for i in range(args.owners)]
    net = Network(roles).up()
    fed = Federation(net, args.dir.resolve())
    try:
        fed.start_model_owner(fed.start_registry() if args.postgres else "")
        for role in roles:
            fed.add_owner(role)
        job_id, tokens = fed.create_job(len(roles), args.rounds)
        fed.bring_owners_in(job_id, tokens)
        fed.admin("jobs", "start", job_id, "--wait", timeout=1800)
        releases = fed.admin("releases", "list", "--job", job_id)
        print(
            json.dumps(
                {
                    "job": job_id,
                    "releases": releases,
                    "hosts": {r: h.address for r, h in net.hosts.items()},
                    "logs": str(fed.state),
                },
                indent=2,
            )
        )
        if args.keep:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        fed.stop()
        net.down()


if __name__ == "__main__":
    main()
