"""Sparse uploads: only what a client trained travels, and the server averages it correctly."""

import numpy as np
import pytest

from offsite.server.federation.config import FederationConfig, FederationConfigError
from offsite.wire import (
    ERROR_KEY,
    SPARSE_KEY,
    AdapterMismatchError,
    SparseMean,
    decode_sparse_delta,
    encode_sparse_delta,
    numpy_to_record,
    record_nbytes,
)
from flwr.app import Array, ArrayRecord


def _base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layers.0.q.weight": rng.normal(size=(8, 16)).astype(np.float32),
        "layers.0.norm.weight": np.ones(16, dtype=np.float32),
        "layers.1.q.weight": rng.normal(size=(8, 16)).astype(np.float32),
    }


def _trained(base, cols=(1, 5, 6), norm=True, full=None):
    """A client's adapter after training: some input columns of one weight, the norm, maybe a whole tensor."""
    rng = np.random.default_rng(1)
    new = {k: v.copy() for k, v in base.items()}
    new["layers.0.q.weight"][:, list(cols)] += rng.normal(scale=0.01, size=(8, len(cols))).astype(np.float32)
    if norm:
        new["layers.0.norm.weight"] += 0.001
    if full:
        new[full] += rng.normal(scale=0.01, size=new[full].shape).astype(np.float32)
    return new


@pytest.mark.parametrize("fmt, tol", [("sparse-fp16", 1e-3), ("sparse-int8", 1e-2)])
def test_only_trained_tensors_and_columns_travel_and_decode_back(fmt, tol):
    base = _base()
    new = _trained(base)
    record, metrics = encode_sparse_delta(new, base, fmt)
    assert metrics[SPARSE_KEY] == 1.0 and 0 < metrics[ERROR_KEY] < tol
    assert "layers.1.q.weight" not in record  # untouched: not sent
    assert list(record["layers.0.q.weight|cols"].numpy()) == [1, 5, 6]
    assert record["layers.0.q.weight"].numpy().shape == (8, 3)
    assert record_nbytes(record) < record_nbytes(numpy_to_record(new)) / 2  # tiny tensors: .npy headers dominate
    delta = decode_sparse_delta(record, base)
    values, cols = delta["layers.0.q.weight"]
    want = (new["layers.0.q.weight"] - base["layers.0.q.weight"])[:, [1, 5, 6]]
    np.testing.assert_allclose(values, want, atol=tol * np.abs(want).max())
    assert list(cols) == [1, 5, 6] and delta["layers.0.norm.weight"][1] is None


def test_an_owner_that_did_not_train_a_tensor_does_not_pull_it_to_zero():
    base = _base()
    a = _trained(base, cols=(1, 5, 6), norm=False)
    b = _trained(base, cols=(5, 9), norm=False, full="layers.1.q.weight")
    mean = SparseMean(base)
    for new, weight in ((a, 1.0), (b, 3.0)):
        record, _ = encode_sparse_delta(new, base, "sparse-fp16")
        mean.add(decode_sparse_delta(record, base), weight)
    out = mean.apply(base)
    da, db = (x["layers.0.q.weight"] - base["layers.0.q.weight"] for x in (a, b))
    got = out["layers.0.q.weight"] - base["layers.0.q.weight"]
    np.testing.assert_allclose(got[:, 1], da[:, 1], atol=1e-5)  # only A trained column 1: A's update, undiluted
    np.testing.assert_allclose(got[:, 9], db[:, 9], atol=1e-5)  # only B trained column 9
    np.testing.assert_allclose(got[:, 5], (da[:, 5] + 3 * db[:, 5]) / 4, atol=1e-5)  # both: weighted mean
    np.testing.assert_array_equal(got[:, 0], 0)  # nobody trained column 0
    np.testing.assert_allclose(out["layers.1.q.weight"], b["layers.1.q.weight"], atol=1e-5)  # only B
    np.testing.assert_array_equal(out["layers.0.norm.weight"], base["layers.0.norm.weight"])


def test_a_full_reply_beside_sparse_ones_counts_for_every_element():
    base = _base()
    mean = SparseMean(base)
    record, _ = encode_sparse_delta(_trained(base, cols=(2,), norm=False), base, "sparse-fp16")
    mean.add(decode_sparse_delta(record, base), 1.0)
    mean.add({k: (np.full_like(v, 0.5), None) for k, v in base.items()}, 1.0)  # a dense delta
    out = mean.apply(base)
    np.testing.assert_allclose(out["layers.1.q.weight"] - base["layers.1.q.weight"], 0.5, atol=1e-6)
    np.testing.assert_allclose(out["layers.0.q.weight"][:, 0] - base["layers.0.q.weight"][:, 0], 0.5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"layers.9.q.weight": np.zeros((8, 16), np.float16)}, "not a parameter"),
        (
            {"layers.0.q.weight": np.zeros((8, 2), np.float16), "layers.0.q.weight|cols": np.array([3, 16], np.int32)},
            "bad column",
        ),
        (
            {"layers.0.q.weight": np.zeros((8, 2), np.float16), "layers.0.q.weight|cols": np.array([3, 3], np.int32)},
            "bad column",
        ),
        ({"layers.0.q.weight": np.zeros((8, 15), np.float16)}, "shape"),
        ({"layers.0.q.weight": np.zeros((8, 16), np.int8)}, "row scales"),
        ({"layers.0.q.weight": np.zeros((8, 16), np.float64)}, "dtype"),
        ({"layers.0.norm.weight": np.full(16, np.inf, np.float16)}, "non-finite"),
        ({"layers.1.q.weight|cols": np.array([1], np.int32)}, "belongs to no sent tensor"),
    ],
)
def test_malformed_sparse_replies_are_refused_by_name(bad, message):
    record = ArrayRecord({k: Array(v) for k, v in bad.items()})
    with pytest.raises(AdapterMismatchError, match=message):
        decode_sparse_delta(record, _base(), "node 7")


def test_upload_modes_and_privacy_paths():
    common = dict(job_id="j", model="m", bundle="b", bundle_digest="d", job_dir="/tmp/j")
    assert FederationConfig(**common).upload_format == "sparse-fp16"
    assert FederationConfig(**common, secagg=True).upload_format == "full"
    assert FederationConfig(**common, dp_noise_multiplier=1.0, dp_clipping_norm=1.0).upload_format == "full"
    with pytest.raises(FederationConfigError, match="cannot be combined with DP or SecAgg"):
        FederationConfig(**common, upload="sparse-int8", secagg=True)
    with pytest.raises(FederationConfigError, match="upload must be"):
        FederationConfig(**common, upload="zip")


@pytest.fixture
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


def test_the_strategy_averages_sparse_replies_per_element_and_bounds_them(in_a_run):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from offsite.server.federation.strategy import BoundedFedAvg
    from offsite.wire import record_to_numpy

    base = _base()
    a = _trained(base, cols=(1, 5, 6), norm=False)
    b = _trained(base, cols=(5, 9), norm=True)
    poisoned = {k: v.copy() for k, v in base.items()}
    poisoned["layers.1.q.weight"] += 1000.0
    strategy = BoundedFedAvg(norm_bound=1.0, min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    messages = sorted(
        strategy.configure_train(1, numpy_to_record(base), ConfigRecord({}), _Grid(3)),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies = []
    for msg, new in zip(messages, (a, b, poisoned)):
        record, metrics = encode_sparse_delta(new, base, "sparse-int8")
        metrics["num-examples"] = 10.0
        replies.append(Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg))
    out = record_to_numpy(strategy.aggregate_train(1, replies)[0])
    da = a["layers.0.q.weight"] - base["layers.0.q.weight"]
    got = out["layers.0.q.weight"] - base["layers.0.q.weight"]
    np.testing.assert_allclose(got[:, 1], da[:, 1], rtol=0.02, atol=1e-4)  # A alone trained column 1: not diluted
    np.testing.assert_array_equal(got[:, 0], 0)
    moved = np.linalg.norm(out["layers.1.q.weight"] - base["layers.1.q.weight"])
    assert moved <= 1.0 + 1e-4  # only the poisoned owner sent it, and its update was bounded to norm 1
    report = strategy.report
    assert sorted(c.scale < 1 for c in report.clients) == [False, False, True]
    assert all(c.bytes_up < record_nbytes(numpy_to_record(base)) for c in report.clients[:2])


def test_a_data_owner_sends_only_what_its_scheme_trained(tmp_path, in_a_run):
    """The real ClientApp handler on a tiny bundle: a top-block channel scheme uploads those columns only."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType

    from offsite.client.flower_app import train_handler
    from offsite.emulators.bundle import load_bundle
    from offsite.server.federation.job_runner import prepare_local_job
    from offsite.server.federation.server_app import train_config

    job = prepare_local_job(
        tmp_path,
        "tiny-llama",
        clients=1,
        rounds=1,
        local_steps=2,
        batch_size=2,
        block_size=64,
        scheme="top1:channels:0.25",
        min_clients=1,
    )
    base = {k: v.numpy().copy() for k, v in load_bundle(job.cfg.bundle, job.cfg.public_key).adapter_state().items()}
    config = {**train_config(job.cfg), "server-round": 1}
    assert config["upload"] == "sparse-fp16"  # "auto" without DP or SecAgg+
    msg = Message(
        RecordDict({"arrays": numpy_to_record(base), "config": ConfigRecord(config)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = train_handler(msg, ctx, job.settings)
    record, metrics = reply.content["arrays"], reply.content["metrics"]
    assert metrics[SPARSE_KEY] == 1.0 and 0 <= metrics[ERROR_KEY] < 1e-3
    sent = {k for k in record.keys() if "|" not in k}
    top = max(int(k.split(".")[2]) for k in base)
    assert sent and all(k.startswith(f"model.layers.{top}.") for k in sent)  # only the trained block
    assert all(k + "|cols" in record for k in sent)  # and only its trained input columns
    assert record_nbytes(record) < record_nbytes(numpy_to_record(base)) / 10
    mean = SparseMean(base)
    mean.add(decode_sparse_delta(record, base), 1.0)
    out = mean.apply(base)
    untouched = [k for k in base if k not in sent]
    assert untouched and all(np.array_equal(out[k], base[k]) for k in untouched)
    assert any(not np.array_equal(out[k], base[k]) for k in sent)
