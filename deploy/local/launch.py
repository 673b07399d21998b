"""Start the Offsite federation topology as processes on one machine.

    python deploy/local/launch.py --dir STATE --nodes 3 [--port 9092] [--server]

STATE/ gets: tls/ (a private CA and the SuperLink's certificate), nodes/node-i/ (each
SuperNode's ECDSA P-384 key), superexec.secret, flwr-home/config.toml (the `offsite`
SuperLink connection for `flwr`), logs/. It starts a SuperLink (TLS, SuperNode
authentication, process isolation with an authenticated SuperExec, no runtime dependency
installation, telemetry off), registers every node key, starts N SuperNodes that read
`python-reference` shard i (or --data DIR/owner-i) and the shared bundle cache
STATE/bundle-cache, and with --server our gRPC server (`offsite-admin serve`) on the same
data dir. Then submit jobs with:

    offsite-admin jobs local run --engine deployment --model tiny-llama --clients 3 --rounds 2 --data-dir STATE

It prints one JSON line with the addresses and pids, keeps running until Ctrl-C (or
SIGTERM), then stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Topology:
    state: Path
    superlink_address: str
    flwr_home: Path
    ca_cert: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_keys: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.processes.items()}


def _spawn(name: str, cmd: list[str], logs: Path, env: dict) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_port(host: str, port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def start(
    state: str | Path,
    nodes: int = 3,
    port: int = 9092,
    data: str = "python-reference",
    server: bool = False,
    server_port: int = 50051,
    node_port: int = 19094,
    threads: int = 1,
) -> Topology:
    from offsite.client.cli_join import generate_node_key, supernode_command
    from offsite.server.federation.deployment import (
        flower_env,
        make_secret,
        make_tls,
        register_supernode,
        superexec_command,
        superlink_command,
        write_flwr_home,
    )
    from offsite.server.federation.job_runner import _signing_key

    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    tls = make_tls(state / "tls")
    secret = make_secret(state / "superexec.secret")
    address = f"127.0.0.1:{port}"
    flwr_home = write_flwr_home(state / "flwr-home", "offsite", address, tls.ca_cert)
    _, signing_pub = _signing_key(state)  # the model owner's key: bundles are signed with it
    (state / "bundle-cache").mkdir(exist_ok=True)
    env = flower_env(flwr_home)
    topo = Topology(state, address, flwr_home, tls.ca_cert)
    try:
        topo.processes["superlink"] = _spawn("superlink", superlink_command(state, tls, secret, port=port), logs, env)
        _wait_port("127.0.0.1", port)
        topo.processes["superexec"] = _spawn("superexec", superexec_command(address, tls, secret), logs, env)
        for i in range(nodes):
            key, pub = generate_node_key(state / "nodes" / f"node-{i}")
            register_supernode(pub, flwr_home, "offsite")
            topo.node_keys.append(pub)
            owner_data = (
                f"python-reference:{i}/{nodes}" if data == "python-reference" else str(Path(data) / f"owner-{i}")
            )
            node_config = {
                "data": owner_data,
                "bundle-cache": str(state / "bundle-cache"),
                "public-key": str(signing_pub),
                "threads": str(threads),
            }
            cmd = supernode_command(address, tls.ca_cert, key, node_config, port=node_port + i)
            topo.processes[f"supernode-{i}"] = _spawn(f"supernode-{i}", cmd, logs, env)
        if server:
            serve = [
                str(Path(sys.executable).parent / "offsite-admin"),
                "serve",
                "--data-dir",
                str(state),
                "--port",
                str(server_port),
                "--federation-address",
                address,
            ]
            topo.processes["server"] = _spawn("server", serve, logs, env)
    except BaseException:
        topo.stop()
        raise
    return topo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dir", required=True, help="state directory (also the --data-dir of offsite-admin jobs local run)"
    )
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet, Control and Runtime APIs, TLS)")
    ap.add_argument(
        "--data", default="python-reference", help="python-reference, or a directory with owner-0, owner-1, ..."
    )
    ap.add_argument("--server", action="store_true", help="also start `offsite-admin serve` on --dir")
    ap.add_argument("--server-port", type=int, default=50051)
    args = ap.parse_args()
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    topo = start(args.dir, args.nodes, args.port, args.data, args.server, args.server_port)
    print(
        json.dumps(
            {
                "superlink": topo.superlink_address,
                "flwr_home": str(topo.flwr_home),
                "ca": str(topo.ca_cert),
                "pids": {k: p.pid for k, p in topo.processes.items()},
                "logs": str(topo.state / "logs"),
            }
        ),
        flush=True,
    )
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            dead = [k for k, v in topo.alive().items() if not v]
            if dead:
                print(json.dumps({"exited": dead}), file=sys.stderr, flush=True)
                break
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        topo.stop()


if __name__ == "__main__":
    main()
