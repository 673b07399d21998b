"""Deployment engine end to end on loopback: SuperLink + 3 SuperNodes -> candidate release.

Real processes, as deploy/local/launch.py starts them: a SuperLink with TLS (private CA),
SuperNode authentication and process isolation (ServerApps run under a SuperExec that
authenticates with a shared secret), no runtime dependency installation, telemetry off;
3 registered SuperNodes, each with its own key and python-reference shard; and one
SuperNode whose key was never registered, which the SuperLink must refuse. The job is
submitted with `flwr run`; the ServerApp writes rounds and the pending-gate release to
job.json and the registry itself.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher():
    spec = importlib.util.spec_from_file_location("offsite_deploy_local", ROOT / "deploy" / "local" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    from offsite.client.cli_join import generate_node_key, supernode_command
    from offsite.server.federation.deployment import flower_env, submit_run
    from offsite.server.federation.job_runner import prepare_local_job

    state = tmp_path_factory.mktemp("deploy")
    topo = _launcher().start(state, nodes=3, port=_free_port(), node_port=_free_port())
    intruder = None
    try:
        key, _ = generate_node_key(state / "intruder")
        cmd = supernode_command(
            topo.superlink_address, topo.ca_cert, key, {"data": "python-reference:0/3"}, port=_free_port()
        )
        intruder_log = open(state / "logs" / "intruder.log", "wb")
        intruder = subprocess.Popen(
            cmd + ["--max-retries", "3", "--max-wait-time", "20"],
            stdout=intruder_log,
            stderr=subprocess.STDOUT,
            env=flower_env(topo.flwr_home),
        )
        job = prepare_local_job(
            state,
            "tiny-llama",
            clients=3,
            rounds=1,
            engine="deployment",
            local_steps=2,
            batch_size=2,
            block_size=128,
            heldout_limit=2,
            min_clients=3,
            round_timeout=180,
        )
        result = submit_run(job.cfg, state / "app", "offsite", topo.flwr_home, wait=True, timeout=420)
        alive = topo.alive()
        yield job, result, alive, state
    finally:
        if intruder is not None and intruder.poll() is None:
            intruder.terminate()
            intruder.wait(timeout=10)
        topo.stop()


def test_round_runs_on_three_authenticated_supernodes(deployed):
    job, result, alive, _ = deployed
    assert result["status"] == "completed", result.get("error")
    assert result["engine"] == "deployment"
    (r1,) = result["rounds"]
    assert len(r1["clients"]) == 3 and r1["dropped"] == []
    assert r1["plugin_ppl"] > 1 and r1["bytes_up"] > 0
    assert all(alive.values()), alive


def test_candidate_release_is_pending_gate_in_the_registry(deployed):
    from offsite.server.registry import Registry

    job, result, _, _ = deployed
    release = result["release"]
    assert release["status"] == "pending-gate"
    reg = Registry(job.cfg.registry_url)
    (row,) = reg.list_releases(job_id=job.cfg.job_id)
    assert row.id == release["id"] and row.status == "pending-gate" and row.adapter_sha256
    assert [r.number for r in reg.list_rounds(job.cfg.job_id)] == [1]
    assert reg.get_job(job.cfg.job_id).state == "completed"


def test_unregistered_supernode_is_refused(deployed):
    _, _, _, state = deployed
    intruder = (state / "logs" / "intruder.log").read_text(errors="replace")
    superlink = (state / "logs" / "superlink.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in intruder
    assert "No SuperNode found with the given public key" in superlink


def test_telemetry_off_and_no_runtime_installs(deployed):
    _, _, _, state = deployed
    superlink_log = (state / "logs" / "superlink.log").read_text(errors="replace")
    assert "uv sync" not in superlink_log
    from offsite.server.federation.deployment import FLOWER_ENV, flower_env

    env = flower_env(state / "flwr-home")
    assert all(env[k] == v for k, v in FLOWER_ENV.items())
    assert json.loads(json.dumps(FLOWER_ENV))["FLWR_TELEMETRY_ENABLED"] == "0"
