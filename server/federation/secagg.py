"""SecAgg+ rounds through Flower's legacy workflow, one round per call.

Flower 1.42 offers SecAgg+ only as a legacy `SecAggPlusWorkflow` over `LegacyContext`.
Clients send their *update* (adapter minus the global adapter) as a nameless list in the
sorted-name order; the workflow returns the example-weighted average of the updates as
unnamed float64 arrays (with a small quantisation error), which `named_from_list` maps
back to names before it is added to the global adapter. The server never sees one
client's update, so update-norm bounds are applied by each client under SecAgg+.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from offsite.wire import named_from_list
from .config import FederationConfig
from .strategy import RoundFailedError


class _CollectingFedAvg(LegacyFedAvg):
    """Legacy FedAvg that keeps the (already securely averaged) result and each client's metrics."""

    def __init__(self, train_config: dict, **kwargs):
        super().__init__(on_fit_config_fn=lambda rnd: {**train_config, "server-round": rnd}, **kwargs)
        self.results: list[tuple[int, FitRes]] = []
        self.failures: list[str] = []
        self.aggregated: list[np.ndarray] | None = None

    def aggregate_fit(self, server_round, results: list[tuple[ClientProxy, FitRes]], failures):
        self.results = [(proxy.node_id, res) for proxy, res in results]
        self.failures = [str(f if isinstance(f, BaseException) else getattr(f[1], "status", f)) for f in failures]
        if not results:
            return None, {}
        # SecAgg+ already replaced every client's parameters with the secure weighted average.
        params = results[0][1].parameters
        self.aggregated = parameters_to_ndarrays(params)
        return params, {}


class SecAggRunner:
    def __init__(self, cfg: FederationConfig, grid: Grid, context: Context, train_config: dict):
        self.cfg = cfg
        self.grid = grid
        self.strategy = _CollectingFedAvg(
            train_config,
            fraction_fit=cfg.fraction,
            fraction_evaluate=0.0,
            min_fit_clients=cfg.min_clients,
            min_evaluate_clients=0,
            min_available_clients=cfg.min_clients,
        )
        self.context = LegacyContext(
            context, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.round_timeout), strategy=self.strategy
        )
        self._thread, self._stop, done = start_update_client_manager_thread(grid, self.context.client_manager)
        done.wait()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _workflow(self) -> SecAggPlusWorkflow:
        cfg = self.cfg
        sampled = max(int(self.context.client_manager.num_available() * cfg.fraction), cfg.min_clients)
        # n masked vectors summed modulo 2**32 must not wrap: keep quantization_range * n below it.
        q_range = 1 << max(16, min(28, (2**32 // (4 * max(sampled, 1))).bit_length() - 1))
        return SecAggPlusWorkflow(
            num_shares=cfg.secagg_shares if cfg.secagg_shares <= 1 else int(cfg.secagg_shares),
            reconstruction_threshold=cfg.secagg_threshold if cfg.secagg_threshold <= 1 else int(cfg.secagg_threshold),
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=q_range,
            max_weight=cfg.secagg_max_weight,
            timeout=cfg.round_timeout,
        )

    def round(self, server_round: int, global_arrays: dict[str, np.ndarray], names: list[str]):
        t0 = time.perf_counter()
        params = ndarrays_to_parameters([global_arrays[n] for n in names])
        nbytes = sum(len(t) for t in params.tensors)
        self.context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(params, keep_input=True)
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()}
        )
        self.strategy.aggregated = None
        self.strategy.results = []
        workflow = self._workflow()
        t1 = time.perf_counter()
        workflow(self.grid, self.context)
        t2 = time.perf_counter()
        if self.strategy.aggregated is None:
            raise RoundFailedError(
                f"round {server_round}: secure aggregation did not complete (too few clients or shares); "
                f"failures: {self.strategy.failures[:3]}"
            )
        mean_update = named_from_list(names, global_arrays, self.strategy.aggregated)
        new_global = {n: (global_arrays[n] + mean_update[n]).astype(np.float32) for n in names}
        t3 = time.perf_counter()
        clients = []
        for node_id, res in self.strategy.results:
            m = dict(res.metrics)
            clients.append(
                {
                    "node_id": int(node_id),
                    "examples": int(res.num_examples),
                    "loss_first": m.get("loss-first"),
                    "loss_last": m.get("loss-last"),
                    "eval_ppl_before": m.get("eval-ppl-before"),
                    "eval_ppl_after": m.get("eval-ppl-after"),
                    "train_seconds": m.get("train-seconds"),
                    "update_norm": m.get("update-norm"),
                    "bounded_scale": None,
                    "bytes_up": None,
                }
            )
        n_params = sum(int(a.size) for a in global_arrays.values())
        return new_global, {
            "round": server_round,
            "sampled": len(clients) + len(self.strategy.failures),
            "clients": clients,
            "dropped": [{"node_id": None, "error": f[:500]} for f in self.strategy.failures],
            "bytes_down": nbytes * len(clients),
            # Masked vectors are uint arrays of the same length plus the weight; not observable here.
            "bytes_up": n_params * 8 * len(clients),
            "client_seconds": t2 - t1,
            "server_seconds": (t1 - t0) + (t3 - t2),
            "secagg": True,
        }
