"""FedAvg with a per-client bound on the update norm, and DP accounting.

Each client's update (its adapter minus the round's global adapter) is scaled down to at
most `norm_bound` before the weighted average, so one poisoned or broken client moves
the global adapter by at most `weight_share * norm_bound`, whatever it sends. Replies with
errors (a client that dropped out) are left out; the round fails only when fewer than
`min_train_nodes` usable replies remain. Full uploads are averaged by Flower's
`aggregate_arrayrecords`; sparse uploads (`offsite.wire`: deltas of the tensors and
columns a client trained) by `SparseMean`, each element over the owners that sent it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from offsite.wire import (
    SPARSE_KEY,
    AdapterMismatchError,
    SparseMean,
    bound_update,
    check_same_layout,
    decode_sparse_delta,
    numpy_to_record,
    record_nbytes,
    record_to_numpy,
    sparse_norm,
)

UNIT_WEIGHT_KEY = "unit-weight"  # every client reports 1.0: the weight DP's noise calibration assumes
EXAMPLES_KEY = "num-examples"


class RoundFailedError(RuntimeError):
    """Too few clients replied for the round to count."""


@dataclass
class ClientReport:
    node_id: int
    metrics: dict
    update_norm: float
    scale: float
    bytes_up: int
    error: str = ""


@dataclass
class RoundReport:
    sent: int = 0
    bytes_down: int = 0
    clients: list[ClientReport] = field(default_factory=list)
    failures: list[ClientReport] = field(default_factory=list)


class BoundedFedAvg(FedAvg):
    """Flower's FedAvg, plus update-norm bounds, layout checks and per-client reports."""

    def __init__(self, *, norm_bound: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.norm_bound = norm_bound
        self.report = RoundReport()
        self._global: dict | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = record_to_numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.report = RoundReport(sent=len(messages), bytes_down=record_nbytes(arrays) * len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's consistency check rejects the whole round for one bad reply; check per reply instead.
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        for msg in errors:
            self.report.failures.append(ClientReport(msg.metadata.src_node_id, {}, 0.0, 0.0, 0, str(msg.error.reason)))
        records: list[RecordDict] = []
        sparse: list[tuple[dict, float, float]] = []
        full: list[tuple[dict, float]] = []
        for msg in valid:
            node = msg.metadata.src_node_id
            content = msg.content
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                self.report.failures.append(
                    ClientReport(node, {}, 0.0, 0.0, 0, "reply must hold one ArrayRecord and one MetricRecord")
                )
                continue
            reply_arrays = next(iter(content.array_records.values()))
            metrics = dict(next(iter(content.metric_records.values())))
            weight = metrics.get(self.weighted_by_key)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
                self.report.failures.append(
                    ClientReport(node, metrics, 0.0, 0.0, 0, f"reply lacks a positive {self.weighted_by_key!r}")
                )
                continue
            try:
                if metrics.get(SPARSE_KEY) == 1.0:
                    delta = decode_sparse_delta(reply_arrays, self._global, f"node {node}")
                else:
                    arrays = record_to_numpy(reply_arrays)
                    check_same_layout(self._global, arrays, f"node {node}")
            except AdapterMismatchError as e:
                log(INFO, "aggregate_train: leaving out node %s: %s", node, e)
                self.report.failures.append(ClientReport(node, metrics, 0.0, 0.0, record_nbytes(reply_arrays), str(e)))
                continue
            if metrics.get(SPARSE_KEY) == 1.0:
                norm = sparse_norm(delta)
                scale = min(1.0, self.norm_bound / norm) if self.norm_bound > 0 and norm > 0 else 1.0
                sparse.append((delta, float(weight), scale))
            else:
                arrays, norm, scale = bound_update(arrays, self._global, self.norm_bound)
                full.append((arrays, float(weight)))
            if scale < 1.0:
                log(INFO, "aggregate_train: node %s update norm %.4g bounded to %.4g", node, norm, self.norm_bound)
            self.report.clients.append(ClientReport(node, metrics, norm, scale, record_nbytes(reply_arrays)))
            records.append(RecordDict({"metrics": MetricRecord(metrics)}))
        if len(records) < max(1, self.min_train_nodes):
            raise RoundFailedError(
                f"round {server_round}: {len(records)} usable replies of {self.report.sent} sampled "
                f"(minimum {self.min_train_nodes}); failures: "
                + "; ".join(f"node {f.node_id}: {f.error[-300:]}" for f in self.report.failures)
            )
        metrics_out = self.train_metrics_aggr_fn(records, self.weighted_by_key)
        if not sparse:
            with_arrays = [
                RecordDict({"arrays": numpy_to_record(a), "metrics": r["metrics"]}) for (a, _), r in zip(full, records)
            ]
            return aggregate_arrayrecords(with_arrays, self.weighted_by_key), metrics_out
        # Sparse replies (and any full ones beside them, as dense deltas): each element is the
        # weighted mean over the owners that sent it; what nobody sent keeps its global value.
        mean = SparseMean(self._global)
        for delta, weight, scale in sparse:
            mean.add(delta, weight, scale)
        for arrays, weight in full:
            mean.add({k: (arrays[k] - self._global[k], None) for k in self._global}, weight)
        return numpy_to_record(mean.apply(self._global)), metrics_out
