"""Simulation engine, 3 data owners on a tiny model: dropout, a failed round, resume, release.

One job of 3 rounds, run twice through Flower's Simulation Engine (Ray start-up is the
slow part, so the module shares these two runs):
- run 1: round 1 all three clients; round 2 client 1 drops out mid-round (the round still
  counts with two); round 3 two clients drop out, fewer than min_clients=2, so the round
  and the job fail with the last completed round on disk.
- run 2 (the "restarted server"): resumes from round 2, completes round 3, and creates the
  candidate release with status pending-gate.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from offsite.client.flower_app import ClientSettings, train_handler  # noqa: E402
from offsite.emulators.adapter import load_adapter  # noqa: E402
from offsite.emulators.bundle import load_bundle  # noqa: E402
from offsite.server.federation.job_runner import prepare_local_job, read_job, run_simulation_job  # noqa: E402
from offsite.server.federation.strategy import RoundFailedError  # noqa: E402
from offsite.server.registry import Registry  # noqa: E402

FAILURES = {2: {1}, 3: {1, 2}}  # round -> partitions that crash mid-round


def flaky_client_app(settings: ClientSettings, failures: dict[int, set[int]]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        if int(ctx.node_config["partition-id"]) in failures.get(rnd, set()):
            raise ConnectionError(f"data owner {ctx.node_config['partition-id']} went away in round {rnd}")
        return train_handler(msg, ctx, settings)

    return app


def _ray_pickles_this_module_by_value():
    # Ray workers cannot import a pytest module by name; ship the closure's code instead.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _ray_pickles_this_module_by_value()
    data_dir = tmp_path_factory.mktemp("fed")
    job = prepare_local_job(
        data_dir,
        "tiny-llama",
        clients=3,
        rounds=3,
        local_steps=2,
        batch_size=2,
        block_size=128,
        heldout_limit=4,
        min_clients=2,
        norm_bound=50.0,
        round_timeout=120,
    )
    with pytest.raises(RoundFailedError, match="round 3: 1 usable replies of 3"):
        run_simulation_job(job, client_app=flaky_client_app(job.settings, FAILURES))
    first = read_job(job.cfg.job_dir)
    second = run_simulation_job(job)
    return job, first, second


def test_dropout_does_not_fail_a_round_while_enough_remain(runs):
    _, first, _ = runs
    assert first["status"] == "failed" and "round 3" in first["error"]
    r1, r2 = first["rounds"]
    assert len(r1["clients"]) == 3 and r1["dropped"] == []
    assert len(r2["clients"]) == 2 and len(r2["dropped"]) == 1
    assert "went away in round 2" in r2["dropped"][0]["error"]


def test_round_metrics_per_client(runs):
    _, first, _ = runs
    r1 = first["rounds"][0]
    for c in r1["clients"]:
        assert c["examples"] > 0
        assert math.isfinite(c["loss_last"]) and c["eval_ppl_after"] > 1
        assert c["bytes_up"] > 0 and c["update_norm"] > 0
    # upload "auto": sparse fp16 deltas of what each client trained (scheme full: every tensor, half the bytes)
    for c in r1["clients"]:
        assert c["bytes_up"] <= r1["bytes_down"] / 3 / 2 + 4096
    assert math.isfinite(r1["plugin_ppl"]) and r1["round_seconds"] > r1["server_seconds"] > 0


def test_restart_resumes_from_last_completed_round_and_releases(runs):
    job, first, second = runs
    assert second["status"] == "completed" and second["resumed_from_round"] == 2
    assert [r["round"] for r in second["rounds"]] == [1, 2, 3]
    for old, new in zip(first["rounds"], second["rounds"][:2]):  # rounds 1-2 were not trained again
        assert (new["clients"], new["plugin_ppl"], new["adapter_path"]) == (
            old["clients"],
            old["plugin_ppl"],
            old["adapter_path"],
        )
    assert len(second["rounds"][2]["clients"]) == 3
    assert second["rounds"][2]["plugin_ppl"] != second["plugin_ppl_initial"]
    release = second["release"]
    assert release["status"] == "pending-gate"
    state, meta = load_adapter(release["adapter_path"])
    bundle = load_bundle(job.cfg.bundle, job.cfg.public_key)
    assert set(state) == set(bundle.adapter_state()) and meta["base_model_digest"] == bundle.base_digest
    assert json.loads((Path(release["model_dir"]) / "config.json").read_text())["model_type"] == "llama"


def test_registry_holds_rounds_events_and_the_candidate(runs):
    job, _, second = runs
    reg = Registry(job.cfg.registry_url)
    rounds = reg.list_rounds(job.cfg.job_id)
    assert [r.number for r in rounds] == [1, 2, 3] and all(r.adapter_sha256 for r in rounds)
    assert rounds[1].metrics["clients"] and rounds[2].metrics["plugin_ppl"] == second["rounds"][2]["plugin_ppl"]
    releases = reg.list_releases(job_id=job.cfg.job_id)
    assert [r.status for r in releases] == ["pending-gate"] and releases[0].id == second["release"]["id"]
    assert reg.get_job(job.cfg.job_id).state == "completed"
    kinds = [e.kind for e in reg.job_events(job.cfg.job_id)]
    assert kinds.count("round") == 3 and "release" in kinds


def test_a_restart_after_the_release_does_not_make_another(runs):
    from offsite.server.federation.server_app import FederatedJob

    job, _, second = runs
    again = FederatedJob(job.cfg, "simulation").run(grid=None, context=None)  # returns before using Flower
    assert again["release"]["id"] == second["release"]["id"]
    assert len(Registry(job.cfg.registry_url).list_releases(job_id=job.cfg.job_id)) == 1
