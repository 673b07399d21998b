"""Data owners whose replies are broken: NaN, Inf, a wrong shape, a wrong dtype, a huge
update, a missing tensor. The round completes without them (or with them bounded) and the
round's report says which node and why.

The replies are real Flower `Message`s through the real `BoundedFedAvg.aggregate_train`
(what the ServerApp calls each round); the vanished-node and slow-node cases run through
the Simulation Engine in tests/test_federation_sim.py (dropout) and test_slow_client.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from offsite.server.federation.arrays import numpy_to_record, record_to_numpy
from offsite.server.federation.strategy import BoundedFedAvg, RoundFailedError


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch):
    """Messages are stamped with the current run's identity; give these offline ones one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


BASE = {
    "model.layers.0.mlp.up_proj.weight": np.zeros((8, 4), np.float32),
    "model.layers.0.input_layernorm.weight": np.ones(4, np.float32),
}


def _honest(seed):
    rng = np.random.default_rng(seed)
    return {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in BASE.items()}


def _with(key, value):
    arrays = _honest(99)
    arrays[key] = value
    return arrays


W, N = "model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"
BAD = {
    "nan": (_with(W, np.full((8, 4), np.nan, np.float32)), "non-finite"),
    "inf": (_with(N, np.array([1, np.inf, 1, 1], np.float32)), "non-finite"),
    "-inf-half": (_with(N, np.array([1, -np.inf, 1, 1], np.float16)), "non-finite"),
    "wrong-shape": (_with(W, np.zeros((4, 8), np.float32)), "shape"),
    "missing": ({W: _honest(5)[W]}, "names differ"),
    "extra": ({**_honest(6), "lm_head.weight": np.zeros((2, 2), np.float32)}, "names differ"),
}


def _round(strategy, clients):
    messages = sorted(
        strategy.configure_train(1, numpy_to_record(BASE), ConfigRecord({}), _Grid(len(clients))),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies = [
        Message(
            RecordDict(
                {"arrays": numpy_to_record(a), "metrics": MetricRecord({"num-examples": 10, "unit-weight": 1.0})}
            ),
            reply_to=m,
        )
        for m, a in zip(messages, clients)
    ]
    agg, _ = strategy.aggregate_train(1, replies)
    return record_to_numpy(agg)


@pytest.mark.parametrize("norm_bound", [0.0, 0.5])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_broken_reply_is_left_out_and_the_record_says_why(case, norm_bound):
    bad, reason = BAD[case]
    honest = [_honest(i) for i in range(3)]
    strategy = BoundedFedAvg(norm_bound=norm_bound, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    out = _round(strategy, honest + [bad])
    assert all(np.isfinite(v).all() for v in out.values())
    mean = {k: np.mean([h[k] for h in honest], axis=0) for k in BASE}
    for k in BASE:
        np.testing.assert_allclose(out[k], mean[k], atol=1e-6)  # exactly the honest round
    assert len(strategy.report.clients) == 3
    [failure] = strategy.report.failures
    assert failure.node_id == 4 and reason in failure.error, failure.error


def test_a_huge_update_is_bounded_not_averaged_in_whole():
    honest = [_honest(i) for i in range(3)]
    huge = {k: v + np.float32(1e30) for k, v in BASE.items()}  # finite, but 1e30 per element
    strategy = BoundedFedAvg(norm_bound=0.5, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    out = _round(strategy, honest + [huge])
    shift = math.sqrt(sum(float(((out[k] - BASE[k]).astype(np.float64) ** 2).sum()) for k in BASE))
    assert math.isfinite(shift) and shift <= 0.25 * 0.5 + 0.1
    scales = sorted(c.scale for c in strategy.report.clients)
    assert scales[0] < 1e-20 and scales[1:] == [1.0, 1.0, 1.0]  # the report names the bounded node


def test_only_broken_replies_fail_the_round_with_every_reason():
    strategy = BoundedFedAvg(norm_bound=0.5, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    with pytest.raises(RoundFailedError) as e:
        _round(strategy, [BAD["nan"][0], BAD["wrong-shape"][0], _honest(1)])
    assert "1 usable replies of 3" in str(e.value)
    assert "node 1" in str(e.value) and "node 2" in str(e.value)
