"""The federation across hosts: network namespaces joined by veth pairs stand in for machines.

deploy/netns/federation.py builds it: the model owner's host (10.77.0.1) runs the SuperLink,
the SuperExec and `offsite-admin serve`, all with TLS under a certificate issued for
10.77.0.1; three data owners (10.77.0.11-13), each with its own client home, cache and node
key, run `offsite-client enroll`, `fetch` and `join`; a fourth host joins with a key the model
owner never registered. The job runs to a pending-gate release through the shipped CLIs.

Needs root, iproute2 and nftables; skips with the reason otherwise, except under
OFFSITE_REQUIRE_NETNS=1 (.ci/run as root), where that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from offsite.server.postgres import PostgresUnavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
OWNERS = ["owner-1", "owner-2", "owner-3"]


def _load(name: str):
    path = ROOT / "deploy" / "netns" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


netns = _load("netns")
federation = _load("federation")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    try:
        netns.check_available()
    except netns.NetnsUnavailable as e:
        if os.environ.get("OFFSITE_REQUIRE_NETNS") == "1":
            pytest.fail(f"network namespaces are required here (OFFSITE_REQUIRE_NETNS=1, set by .ci/run as root): {e}")
        pytest.skip(f"no network namespaces here: {e}")
    t0, phases = time.monotonic(), {}

    def mark(name: str) -> None:  # seconds since the start, per phase (printed at the end)
        phases[name] = round(time.monotonic() - t0, 1)

    net = netns.Network([*OWNERS, "intruder"]).up()
    fed = federation.Federation(net, tmp_path_factory.mktemp("netns"))
    registry_port = None
    try:
        try:  # the registry on PostgreSQL on the model owner's host, when a server can start here
            database_url = fed.start_registry()
            registry_port = federation.REGISTRY_PORT
        except PostgresUnavailable as e:
            if os.environ.get("OFFSITE_REQUIRE_POSTGRES") == "1":
                raise
            print(f"registry on SQLite: {e}")
            database_url = ""
        mark("hosts + PostgreSQL")
        fed.start_model_owner(database_url)
        mark("model owner up")
        for role in OWNERS:
            fed.add_owner(role)
        job_id, tokens = fed.create_job(len(OWNERS), rounds=1)
        mark("model, bundle, job, tokens")
        # A data owner's host whose node key the model owner never registered (joins beside the others).
        fed.add_owner("intruder")
        intruder = threading.Thread(
            target=fed.join,
            args=("intruder", job_id, "python-reference:0/3"),
            kwargs={"register": False, "extra": ["--superlink", fed.superlink, "--public-key", str(fed.signing_pub)]},
        )
        intruder.start()
        fetched = fed.bring_owners_in(job_id, {r: t for r, t in tokens.items() if r in OWNERS})
        intruder.join(300)
        mark("owners enrolled, fetched, joined")
        started = fed.admin("jobs", "start", job_id, "--wait", timeout=900)
        mark("job run to its release")
        print(f"netns phases (s since start): {phases}")
        (fed.state / "phases.json").write_text(json.dumps(phases))
        peers = _established_peers(net.server, federation.SUPERLINK_PORT)
        yield {
            "fed": fed,
            "net": net,
            "job": job_id,
            "fetched": fetched,
            "started": started,
            "peers": peers,
            "registry_port": registry_port,
        }
    finally:
        fed.stop()
        net.down()


def _established_peers(host, port: int) -> set[str]:
    """Remote addresses of the TCP connections to `port` on `host` right now (ss, in its namespace)."""
    out = host.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"]).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_job_runs_across_hosts_to_a_pending_gate_release(deployed):
    fed, job_id = deployed["fed"], deployed["job"]
    assert deployed["started"]["state"] == "succeeded", deployed["started"]
    job = fed.admin("jobs", "get", job_id)
    assert job["state"] == "JOB_STATE_COMPLETED", job
    assert sorted(job["data_owners"]) == OWNERS
    (release,) = fed.admin("releases", "list", "--job", job_id)
    assert release["status"] == "pending-gate" and int(release["adapter"]["size"]) > 0
    job_json = json.loads((fed.state / "model-owner" / "srv" / "work" / job_id / "job.json").read_text())
    (r1,) = job_json["rounds"]
    assert len(r1["clients"]) == 3 and r1["dropped"] == [] and r1["bytes_up"] > 0
    if deployed["registry_port"]:
        # The run config reaches every SuperNode: it names the registry without its password ...
        password = fed.db_password.encode()
        job_dir = fed.state / "model-owner" / "srv" / "work" / job_id
        assert b"postgresql+psycopg://postgres@" in (job_dir / "run-config.toml").read_bytes()
        stored = sorted((fed.state / "model-owner").glob("superlink.db*"))  # the SuperLink's runs (+ WAL)
        assert stored
        for path in [job_dir / "run-config.toml", *stored]:
            assert password not in path.read_bytes(), path
        # ... and the ServerApp (under the SuperExec, PGPASSWORD) still wrote its round to PostgreSQL.
        sql = f"SELECT count(*) FROM rounds WHERE job_id = '{job_id}'"
        psql = [
            "psql",
            "-h",
            fed.net.server.address,
            "-p",
            str(deployed["registry_port"]),
            "-U",
            "postgres",
            "-Atc",
            sql,
        ]
        assert fed.net.server.run(psql, env=fed.model_owner.env).stdout.strip() == "1"


def test_traffic_crossed_the_veth_links_from_each_owner_address(deployed):
    net = deployed["net"]
    accepted = net.accepted()
    for role in OWNERS:
        address = net.hosts[role].address
        # The model owner's kernel saw these connections come from the owner's own address.
        for port in (federation.SUPERLINK_PORT, federation.API_PORT):
            assert accepted[(address, port)]["bytes"] > 0, (role, port, accepted)
        # The bundle came down this owner's veth link (not loopback): its link received at least that much.
        size = int(deployed["fetched"][role]["size"])
        assert deployed["fetched"][role]["downloaded"] == size
        assert net.hosts[role].link_stats()["rx_bytes"] > size
    assert {net.hosts[r].address for r in OWNERS} <= deployed["peers"], deployed["peers"]
    assert "127.0.0.1" not in deployed["peers"]


def test_unregistered_data_owner_is_refused(deployed):
    fed = deployed["fed"]
    intruder = fed.owners["intruder"].log("supernode")
    superlink = fed.model_owner.log("superlink")
    assert "Failed to activate SuperNode" in intruder, intruder[-2000:]
    assert "No SuperNode found with the given public key" in superlink


def test_data_owner_hosts_cannot_reach_the_model_owners_private_ports(deployed):
    net = deployed["net"]
    server, owner = net.server, net.hosts["owner-1"]
    before = net.accepted()
    # Open to data owners: the SuperLink's Fleet port and the API (enroll, fetch).
    assert netns.can_connect(owner, server.address, federation.SUPERLINK_PORT)
    assert netns.can_connect(owner, server.address, federation.API_PORT)
    # The SuperExec's health port listens on every interface of the model owner's host ...
    assert netns.can_connect(server, server.address, federation.SUPEREXEC_HEALTH_PORT)
    # ... and the firewall drops it from a data owner's host (a timeout, not a refusal).
    assert not netns.can_connect(owner, server.address, federation.SUPEREXEC_HEALTH_PORT, timeout=1.5)
    # The SuperLink itself listens on the model owner's loopback only.
    assert not netns.can_connect(owner, server.address, federation.SUPERLINK_PRIVATE_PORT, timeout=1.5)
    port = deployed["registry_port"]
    if port is not None:  # the registry's PostgreSQL: the model owner's server uses it, data owners cannot reach it
        assert netns.can_connect(server, server.address, port)
        assert not netns.can_connect(owner, server.address, port, timeout=1.5)
    after = net.accepted()
    assert (
        after[(owner.address, federation.API_PORT)]["packets"] > before[(owner.address, federation.API_PORT)]["packets"]
    )


def test_nothing_left_behind_in_the_machine_namespace():
    # The hosts live only in their own namespaces: the machine's own interfaces are untouched.
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "br0" not in out and "veth" not in out


def test_data_owner_cannot_use_the_superlink_control_api(deployed):
    # Flower serves the Control API on the Fleet port without credentials: the proxy in front
    # passes data owners /v1/fleet/* only (without it, `flwr ls` from a data owner answered).
    from offsite.server.federation.deployment import write_flwr_home

    fed = deployed["fed"]
    owner = fed.owners["owner-1"]
    home = write_flwr_home(owner.root / "outsider-flwr-home", "x", fed.superlink, fed.ca)
    proc = owner.host.run(
        [str(federation.BIN / "flwr"), "ls", "x", "--format", "json"],
        env={**owner.env, "FLWR_HOME": str(home)},
        timeout=180,
    )
    assert proc.returncode != 0 or '"success": false' in proc.stdout, proc.stdout[-500:]
    # The Fleet proxy refused it: the SuperLink (on 127.0.0.1 only) never saw the call.
    assert "refused POST /v1/control/" in fed.model_owner.log("fleet-proxy")
