"""A data owner that sleeps in training beyond the round timeout, in Flower's Simulation Engine.

Three virtual data owners on the tiny model, one of which sleeps far past `round_timeout`.
The policy: with `min_clients` replies still in, the round completes on the others (their
mean), and the round's record names the slow node and why; with too few, the round fails
and its error names the slow node. (The slow ClientApp is a Python object, so this uses the
in-process engine; the ServerApp, the strategy and Ray are the real ones.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from offsite.client.flower_app import ClientSettings, train_handler  # noqa: E402
from offsite.server.federation.job_runner import prepare_local_job, read_job, run_simulation_job  # noqa: E402
from offsite.server.federation.strategy import RoundFailedError  # noqa: E402

SLOW_PARTITION = 2
ROUND_TIMEOUT_S = 90.0


def slow_client_app(settings: ClientSettings, job_dir: str) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        if int(ctx.node_config["partition-id"]) == SLOW_PARTITION:
            (Path(job_dir) / "slow-node.txt").write_text(str(ctx.node_id))
            # Sleeps past the round timeout; ends early once the job is over, so Ray's shutdown
            # does not wait on it.
            deadline = time.monotonic() + 10 * ROUND_TIMEOUT_S
            while time.monotonic() < deadline:
                job = Path(job_dir) / "job.json"
                if job.exists() and json.loads(job.read_text()).get("status") in ("completed", "failed"):
                    break
                time.sleep(0.5)
        return train_handler(msg, ctx, settings)

    return app


def _job(tmp_path, min_clients: int):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    return prepare_local_job(
        tmp_path,
        "tiny-llama",
        clients=3,
        rounds=1,
        local_steps=1,
        batch_size=1,
        block_size=64,
        heldout_limit=2,
        min_clients=min_clients,
        round_timeout=ROUND_TIMEOUT_S,
    )


def test_a_slow_client_is_dropped_by_name_and_the_round_completes(tmp_path):
    job = _job(tmp_path, min_clients=2)
    started = time.monotonic()
    done = run_simulation_job(job, client_app=slow_client_app(job.settings, job.cfg.job_dir))
    assert done["status"] == "completed" and done["release"]
    (record,) = done["rounds"]
    slow = int((Path(job.cfg.job_dir) / "slow-node.txt").read_text())
    assert len(record["clients"]) == 2 and slow not in [c["node_id"] for c in record["clients"]]
    assert record["dropped"] == [
        {"node_id": slow, "error": f"no reply within the round timeout ({ROUND_TIMEOUT_S:g} s)"}
    ]
    assert time.monotonic() - started < 8 * ROUND_TIMEOUT_S  # it did not wait for the sleeper


def test_too_few_replies_in_time_fail_the_round_naming_the_slow_node(tmp_path):
    job = _job(tmp_path, min_clients=3)
    with pytest.raises(RoundFailedError) as failed:
        run_simulation_job(job, client_app=slow_client_app(job.settings, job.cfg.job_dir))
    slow = (Path(job.cfg.job_dir) / "slow-node.txt").read_text()
    assert f"node {slow}: no reply within the round timeout" in str(failed.value)
    assert read_job(job.cfg.job_dir)["status"] == "failed"
