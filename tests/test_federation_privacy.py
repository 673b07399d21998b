"""Robustness and privacy options of the federation.

- update-norm bound: one poisoned client cannot swamp a round (Flower messages, no Ray);
- a 3-client round through the Simulation Engine with SecAgg+: the securely summed result,
  mapped back to names, matches the example-weighted mean of the same three clients'
  adapters (trained here, in-process, with the same seeds) up to quantisation;
- the same round with DP: clients clip, the server adds calibrated Gaussian noise and
  reports epsilon from Flower's RDP accountant.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from offsite.emulators.adapter import load_adapter
from offsite.server.federation.arrays import numpy_to_record, record_to_numpy
from offsite.server.federation.strategy import BoundedFedAvg, RoundFailedError


@pytest.fixture
def in_a_run(monkeypatch):
    """Messages are stamped with the current run's identity; give these offline ones one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


class _Grid:
    """Only what FedAvg.configure_train asks of a grid: the connected node ids."""

    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _round(strategy, global_arrays, client_arrays, examples):
    messages = list(
        strategy.configure_train(1, numpy_to_record(global_arrays), ConfigRecord({}), _Grid(len(client_arrays)))
    )
    replies = []
    for msg, arrays, n in zip(sorted(messages, key=lambda m: m.metadata.dst_node_id), client_arrays, examples):
        content = RecordDict(
            {"arrays": numpy_to_record(arrays), "metrics": MetricRecord({"num-examples": n, "unit-weight": 1.0})}
        )
        replies.append(Message(content, reply_to=msg))
    agg, _ = strategy.aggregate_train(1, replies)
    return record_to_numpy(agg)


def test_norm_bound_limits_a_poisoned_client(in_a_run):
    rng = np.random.default_rng(0)
    base = {
        "model.layers.0.mlp.up_proj.weight": rng.normal(size=(16, 8)).astype(np.float32),
        "model.layers.7.input_layernorm.weight": np.ones(8, np.float32),
    }
    honest = [{k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(3)]
    poisoned = {k: v + 1000.0 for k, v in base.items()}
    clients, examples = honest + [poisoned], [10, 10, 10, 10]

    def dist(a, b):
        return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))

    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in base}
    unbounded = _round(
        BoundedFedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0), base, clients, examples
    )
    bounded_strategy = BoundedFedAvg(norm_bound=0.5, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    bounded = _round(bounded_strategy, base, clients, examples)
    assert dist(unbounded, honest_mean) > 1000  # FedAvg alone is swamped
    # bounded: the poisoned client moves the average by at most its weight (1/4) times the bound
    assert dist(bounded, honest_mean) <= 0.25 * 0.5 + 0.25 * dist(honest_mean, base) + 1e-4
    scales = sorted(c.scale for c in bounded_strategy.report.clients)
    assert scales[0] < 1e-3 and scales[1:] == [1.0, 1.0, 1.0]  # only the poisoned update was scaled


def test_too_few_usable_replies_fail_the_round(in_a_run):
    base = {"w": np.zeros(4, np.float32)}
    strategy = BoundedFedAvg(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    wrong_layout = {"other": np.zeros(4, np.float32)}
    with pytest.raises(RoundFailedError, match="2 usable replies of 3"):
        _round(strategy, base, [base, base, wrong_layout], [1, 1, 1])


# --- the same round three ways through the Simulation Engine ------------------------------

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    from offsite.server.federation.job_runner import prepare_local_job, run_simulation_job

    data_dir = tmp_path_factory.mktemp("privacy")
    common = dict(clients=3, rounds=1, local_steps=2, batch_size=2, block_size=128, heldout_limit=2, min_clients=3)
    out = {}
    for name, extra in {
        "secagg": {"secagg": True},
        "dp": {"dp_noise_multiplier": 1.0, "dp_clipping_norm": 0.02, "dp_population": 3},
    }.items():
        job = prepare_local_job(data_dir, "tiny-llama", **common, **extra)
        out[name] = (job, run_simulation_job(job))
    return out


def _final(job):
    state, _ = load_adapter(job["release"]["adapter_path"])
    return {k: v.numpy() for k, v in state.items()}


def _initial(job):
    from offsite.emulators.bundle import load_bundle

    return {k: v.numpy() for k, v in load_bundle(job.cfg.bundle, job.cfg.public_key).adapter_state().items()}


def _plain_fedavg(job):
    """The example-weighted mean of the three clients' round-1 adapters, trained in this process."""
    import torch
    from flwr.app import ConfigRecord as _Cfg

    from offsite.client.flower_app import train_local
    from offsite.server.federation.server_app import train_config

    cfg = _Cfg({**train_config(job.cfg), "server-round": 1})
    initial = {k: torch.from_numpy(v) for k, v in _initial(job).items()}
    states, weights = [], []
    for i in range(job.clients):
        state, metrics = train_local(dict(initial), cfg, job.settings.resolved({"partition-id": i}))
        states.append({k: v.numpy().astype(np.float64) for k, v in state.items()})
        weights.append(metrics["num-examples"])
    total = float(sum(weights))
    return {k: sum(w / total * s[k] for w, s in zip(weights, states)) for k in states[0]}


def test_secagg_round_matches_plain_fedavg(two_ways):
    job, sec = two_ways["secagg"]
    assert sec["status"] == "completed" and sec["release"]["status"] == "pending-gate"
    assert sec["rounds"][0]["secagg"] and len(sec["rounds"][0]["clients"]) == 3
    expected, got = _plain_fedavg(job), _final(sec)
    assert set(expected) == set(got)  # names came back from SecAgg+'s unnamed arrays
    worst = max(float(np.abs(expected[k] - got[k]).max()) for k in expected)
    assert worst < 1e-4, f"SecAgg+ result differs from FedAvg by {worst}"


def test_dp_clips_adds_noise_and_reports_epsilon(two_ways):
    job, dp = two_ways["dp"]
    r = dp["rounds"][0]
    assert all(c["update_norm"] <= 0.02 * (1 + 1e-4) for c in r["clients"])  # clipped by fixedclipping_mod
    eps = dp["privacy"]["epsilon"]
    assert math.isfinite(eps) and eps > 0 and dp["privacy"]["delta"] == 1e-5
    # noise: std = z * C / n per coordinate, far larger than the clipped mean update
    init, final = _initial(job), _final(dp)
    diff = np.concatenate([(final[k] - init[k]).ravel() for k in init])
    assert 0.8 < float(diff.std()) / (1.0 * 0.02 / 3) < 1.25
    # one Gaussian release at z=1 without amplification: epsilon from the accountant's own library
    import dp_accounting

    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(dp_accounting.GaussianDpEvent(1.0))
    assert eps == pytest.approx(acct.get_epsilon(1e-5), rel=1e-6)
