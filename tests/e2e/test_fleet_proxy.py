"""The Fleet proxy in front of a real SuperLink, on loopback (no root needed).

Flower 1.42 serves the Control API on the Fleet port without credentials; the proxy passes
/v1/fleet/* only. A registered SuperNode activates and polls through it; `flwr ls` through it
is refused (403) while the same call straight to the SuperLink answers; a request for an
unknown path never reaches the SuperLink.
"""

from __future__ import annotations

import importlib.util
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("offsite_deploy_local", ROOT / "deploy" / "local" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = launch
    spec.loader.exec_module(launch)
    from offsite.client.cli_join import generate_node_key, supernode_command
    from offsite.server.federation.deployment import flower_env, register_supernode

    state = tmp_path_factory.mktemp("proxy")
    superlink_port, proxy_port = _free_port(), _free_port()
    topo = launch.start(state, nodes=0, port=superlink_port)
    tls = state / "tls"
    procs = []
    try:
        proxy_log = open(state / "logs" / "fleet-proxy.log", "wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "offsite.server.fleet_proxy",
                    "--listen",
                    f"127.0.0.1:{proxy_port}",
                    "--upstream",
                    f"127.0.0.1:{superlink_port}",
                    "--ca",
                    str(tls / "ca.pem"),
                    "--cert",
                    str(tls / "superlink.pem"),
                    "--key",
                    str(tls / "superlink.key"),
                ],
                stdout=proxy_log,
                stderr=subprocess.STDOUT,
            )
        )
        launch._wait_port("127.0.0.1", proxy_port)
        key, pub = generate_node_key(state / "node")
        register_supernode(pub, topo.flwr_home, "offsite")
        node_log = open(state / "logs" / "node.log", "wb")
        procs.append(
            subprocess.Popen(
                supernode_command(
                    f"127.0.0.1:{proxy_port}", tls / "ca.pem", key, {"data": "python-reference:0/3"}, port=_free_port()
                ),
                stdout=node_log,
                stderr=subprocess.STDOUT,
                env=flower_env(topo.flwr_home),
            )
        )
        yield {"state": state, "topo": topo, "proxy": f"127.0.0.1:{proxy_port}", "tls": tls}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        topo.stop()


def _flwr_ls(address: str, ca: Path, home: Path) -> subprocess.CompletedProcess:
    from offsite.server.federation.deployment import flower_env, write_flwr_home

    write_flwr_home(home, "x", address, ca)
    return subprocess.run(
        [str(BIN / "flwr"), "ls", "x", "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_supernode_activates_and_polls_through_the_proxy(proxied):
    proxy_log = proxied["state"] / "logs" / "fleet-proxy.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "SuperNode ID" not in (proxied["state"] / "logs" / "node.log").read_text():
        time.sleep(1)
    assert "SuperNode ID" in (proxied["state"] / "logs" / "node.log").read_text()
    assert "Exception" not in proxy_log.read_text()


def test_control_api_refused_through_the_proxy_but_not_directly(proxied):
    ca = proxied["tls"] / "ca.pem"
    direct = _flwr_ls(proxied["topo"].superlink_address, ca, proxied["state"] / "home-direct")
    assert direct.returncode == 0 and '"success": true' in direct.stdout  # the gap the proxy closes
    through = _flwr_ls(proxied["proxy"], ca, proxied["state"] / "home-proxy")
    assert through.returncode != 0 or '"success": false' in through.stdout
    assert "refused POST /v1/control/" in (proxied["state"] / "logs" / "fleet-proxy.log").read_text()


def test_other_paths_get_403(proxied):
    ctx = ssl.create_default_context(cafile=str(proxied["tls"] / "ca.pem"))
    for path in ("/v1/runtime/pull-messages", "/docs", "/v1/fleetX/activate-node"):
        req = urllib.request.Request(f"https://{proxied['proxy']}{path}", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, context=ctx, timeout=30)
        assert e.value.code == 403, path
