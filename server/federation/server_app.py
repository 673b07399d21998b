"""The model owner's Flower `ServerApp`: rounds of FedAvg over adapters.

One round: sample clients, send the global adapter and the training config, collect the
replies that arrive before the round timeout, leave out the ones that failed, bound each
client's update norm, average weighted by examples (uniformly under DP, which Flower's
noise calibration assumes), add DP noise when asked, persist the new global adapter,
measure its plug-in perplexity on the model owner's held-out set, and record the round.
SecAgg+ runs through Flower's legacy SecAggPlusWorkflow, one round at a time inside the
same loop, so checkpoints, metrics and resume work the same way.

`make_server_app(cfg)` serves the simulation engine (settings in-process); the module's
`app` serves `flwr run` (settings from the run config).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from offsite.wire import numpy_to_record, record_to_numpy
from .checkpoint import JOB_FILE, JobCheckpoint
from .config import FederationConfig
from .evaluate import PluginEvaluator
from .recorder import JobRecorder
from .release import make_candidate
from .strategy import EXAMPLES_KEY, UNIT_WEIGHT_KEY, BoundedFedAvg, ClientReport, RoundFailedError

log = logging.getLogger(__name__)


def initial_adapter(cfg: FederationConfig) -> tuple[dict[str, np.ndarray], str]:
    """The bundle's initial adapter (original names) and the base model digest it names."""
    from offsite.emulators.bundle import load_bundle

    bundle = load_bundle(cfg.bundle, cfg.public_key or None)
    state = {k: v.detach().float().cpu().numpy().copy() for k, v in bundle.adapter_state().items()}
    return state, bundle.base_digest


def train_config(cfg: FederationConfig) -> dict:
    return {
        "job-id": cfg.job_id,
        "bundle-digest": cfg.bundle_digest,
        "local-steps": cfg.local_steps,
        "lr": cfg.lr,
        "batch-size": cfg.batch_size,
        "block-size": cfg.block_size,
        "scheme": cfg.scheme,
        "seed": cfg.seed,
        "eval-fraction": cfg.eval_fraction,
        "norm-bound": cfg.norm_bound,
        "upload": cfg.upload_format,
    }


def _client_row(c: ClientReport) -> dict:
    m = c.metrics
    row = {
        "node_id": int(c.node_id),
        "examples": int(m.get(EXAMPLES_KEY, m.get("num_examples", 0))),
        "loss_first": m.get("loss-first"),
        "loss_last": m.get("loss-last"),
        "eval_ppl_before": m.get("eval-ppl-before"),
        "eval_ppl_after": m.get("eval-ppl-after"),
        "train_seconds": m.get("train-seconds"),
        "update_norm": c.update_norm,
        "bounded_scale": c.scale,
        "bytes_up": c.bytes_up,
        "upload_rel_error": m.get("upload-rel-error"),  # sparse uploads: the encoding's measured error
    }
    return row


class FederatedJob:
    def __init__(
        self, cfg: FederationConfig, engine: str = "", evaluator: PluginEvaluator | None = None, on_round=None
    ):
        self.cfg = cfg
        self.engine = engine
        self.checkpoint = JobCheckpoint(cfg.job_dir, cfg.job_id)
        self.recorder = JobRecorder(cfg, engine)
        self.recorder.on_round = on_round
        self.evaluator = evaluator
        self.accountant = None
        self.names: list[str] = []

    # --- the job ------------------------------------------------------------------

    def run(self, grid: Grid, context: Context) -> dict:
        cfg = self.cfg
        try:
            saved = self.checkpoint.load()
            if saved and saved.get("release"):
                # Already finished (a restart after the release): never create a second candidate.
                return json.loads((self.checkpoint.dir / JOB_FILE).read_text())
            if saved and saved["last_round"] >= 1:
                start = saved["last_round"] + 1
                global_arrays = self.checkpoint.load_adapter(saved["last_round"])
                base_digest = saved["extra"]["base_digest"]
                rounds = saved["rounds"]
                extra = saved["extra"]
                self.recorder.resume(rounds, extra)
                log.info("job %s: resuming after round %d", cfg.job_id, saved["last_round"])
            else:
                start, rounds, extra = 1, [], {}
                global_arrays, base_digest = initial_adapter(cfg)
            self.names = sorted(global_arrays)
            if self.evaluator is None:
                self.evaluator = PluginEvaluator(cfg.model, cfg.heldout, cfg.block_size, cfg.heldout_limit)
            if self.evaluator.base_digest != base_digest:
                raise RuntimeError(
                    f"the bundle was built from base model {base_digest[:12]}, but {cfg.model} is {self.evaluator.base_digest[:12]}; "
                    "pass the --model the bundle was built from"
                )
            if "plugin_ppl_initial" not in extra:
                extra["plugin_ppl_initial"] = self.evaluator.plugin_perplexity(global_arrays)
            extra["base_digest"] = base_digest
            self.recorder.start(
                plugin_ppl_initial=extra["plugin_ppl_initial"],
                rounds_planned=cfg.rounds,
                options={"dp": cfg.dp_enabled, "secagg": cfg.secagg, "norm_bound": cfg.norm_bound},
            )
            if cfg.dp_enabled:
                self._setup_accountant(grid, extra)
            step = self._secagg_round if cfg.secagg else self._plain_round
            strategy = None if cfg.secagg else self._strategy(grid)
            legacy = self._legacy_context(grid, context) if cfg.secagg else None
            for server_round in range(start, cfg.rounds + 1):
                t0 = time.perf_counter()
                global_arrays, record = step(server_round, global_arrays, strategy or legacy, grid)
                t_eval = time.perf_counter()
                if server_round % max(1, cfg.eval_every) == 0 or server_round == cfg.rounds:
                    record["plugin_ppl"] = self.evaluator.plugin_perplexity(global_arrays)
                else:
                    record["plugin_ppl"] = None
                record["eval_seconds"] = time.perf_counter() - t_eval
                if self.accountant is not None:
                    extra["accountant"] = self.accountant.state_dict()
                    record["epsilon"] = self.accountant.get_privacy_spent().epsilon
                t_persist = time.perf_counter()
                record["round_seconds"] = time.perf_counter() - t0  # provisional, updated below
                record["adapter_path"] = str(self.checkpoint.adapter_path(server_round))
                rounds.append(record)
                self.checkpoint.save_round(server_round, global_arrays, base_digest, rounds, extra)
                persist = time.perf_counter() - t_persist
                record["server_seconds"] += persist
                record["round_seconds"] = time.perf_counter() - t0
                record["server_overhead_share"] = record["server_seconds"] / max(
                    record["round_seconds"] - record["eval_seconds"], 1e-9
                )
                self.recorder.round(record)
                log.info(
                    "job %s round %d: %d clients, plug-in ppl %s",
                    cfg.job_id,
                    server_round,
                    len(record["clients"]),
                    record["plugin_ppl"],
                )
            if legacy is not None:
                legacy.stop()
            release = make_candidate(
                job_id=cfg.job_id,
                job_dir=self.checkpoint.dir,
                evaluator=self.evaluator,
                adapter=global_arrays,
                base_digest=base_digest,
                model=cfg.model,
                rounds=cfg.rounds,
                plugin_ppl=rounds[-1].get("plugin_ppl"),
                candidate_dir=cfg.candidate_dir,
                artifacts_root=cfg.artifacts_root,
            )
            self.recorder.release(release)
            self.checkpoint.mark_released(release)
            return self.recorder.job
        except BaseException as e:
            self.recorder.failed(f"{type(e).__name__}: {e}")
            raise

    # --- plain / DP rounds (Message API) -------------------------------------------

    def _sample_size(self, grid: Grid) -> int:
        connected = len(list(grid.get_node_ids()))
        return max(int(connected * self.cfg.fraction), self.cfg.min_clients)

    def _strategy(self, grid: Grid):
        cfg = self.cfg
        base = BoundedFedAvg(
            norm_bound=cfg.norm_bound,
            fraction_train=cfg.fraction,
            fraction_evaluate=0.0,  # clients report their own eval ppl with the train reply
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            weighted_by_key=UNIT_WEIGHT_KEY if cfg.dp_enabled else EXAMPLES_KEY,
        )
        self._base = base
        if not cfg.dp_enabled:
            return base
        return DifferentialPrivacyClientSideFixedClipping(
            base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, self._sample_size(grid)
        )

    def _setup_accountant(self, grid: Grid, extra: dict) -> None:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        population = self.cfg.dp_population or len(list(grid.get_node_ids())) or self.cfg.min_clients
        population = max(population, self._sample_size(grid))
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=self.cfg.dp_delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.REPLACE_ONE,
                sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
            )
        )
        if extra.get("accountant"):
            self.accountant.load_state_dict(extra["accountant"])

    def _plain_round(self, server_round: int, global_arrays: dict, strategy, grid: Grid):
        cfg = self.cfg
        t0 = time.perf_counter()
        record = numpy_to_record(global_arrays)
        messages = list(strategy.configure_train(server_round, record, ConfigRecord(train_config(cfg)), grid))
        sent = len(messages)
        t1 = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        t2 = time.perf_counter()
        report = self._base.report
        # Name the sampled nodes that did not answer in time (a slow or vanished data owner),
        # so the round's record and a failed round's error say which.
        answered = {m.metadata.src_node_id for m in replies}
        for node in sorted({m.metadata.dst_node_id for m in messages} - answered):
            report.failures.append(
                ClientReport(node, {}, 0.0, 0.0, 0, f"no reply within the round timeout ({cfg.round_timeout:g} s)")
            )
        ok = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                report.failures.append(ClientReport(m.metadata.src_node_id, {}, 0.0, 0.0, 0, str(m.error.reason)))
        # Flower's DP wrapper skips a whole round if any reply is an error: give it only the good ones.
        arrays, _ = strategy.aggregate_train(server_round, ok)
        if arrays is None:
            raise RoundFailedError(
                f"round {server_round}: aggregation produced nothing ({len(ok)} usable replies of {sent})"
            )
        new_global = record_to_numpy(arrays)
        t3 = time.perf_counter()
        if self.accountant is not None and report.clients:
            n_sampled, k = strategy.num_sampled_clients, min(len(report.clients), strategy.num_sampled_clients)
            # Noise is calibrated to n sampled clients; averaging k < n replies raises each one's
            # sensitivity to C/k, i.e. an effective noise multiplier of z * k / n.
            population = self.accountant.config.population_size
            self.accountant.compose(
                GaussianPrivacyEvent(cfg.dp_noise_multiplier * k / n_sampled, min(sent, population), population)
            )
        return new_global, {
            "round": server_round,
            "sampled": sent,
            "clients": [_client_row(c) for c in report.clients],
            "dropped": [{"node_id": int(f.node_id), "error": f.error[-500:]} for f in report.failures],
            "bytes_down": report.bytes_down,
            "bytes_up": sum(c.bytes_up for c in report.clients),
            "client_seconds": t2 - t1,
            "server_seconds": (t1 - t0) + (t3 - t2),
        }

    # --- SecAgg+ rounds (legacy workflow) -------------------------------------------

    def _legacy_context(self, grid: Grid, context: Context):
        from .secagg import SecAggRunner

        return SecAggRunner(self.cfg, grid, context, train_config(self.cfg))

    def _secagg_round(self, server_round: int, global_arrays: dict, runner, grid: Grid):
        return runner.round(server_round, global_arrays, self.names)


def make_server_app(
    cfg: FederationConfig,
    engine: str = "simulation",
    evaluator: PluginEvaluator | None = None,
    result: dict | None = None,
    on_round=None,
) -> ServerApp:
    """A ServerApp bound to `cfg` (simulation engine: same process, no run config needed)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        job = FederatedJob(cfg, engine, evaluator, on_round).run(grid, context)
        if result is not None:
            result.update(job)

    return server_app


app = ServerApp()


@app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    # A deployed run returns nothing through Flower: results go to job.json and the registry.
    FederatedJob(FederationConfig.from_run_config(dict(context.run_config)), "deployment").run(grid, context)
