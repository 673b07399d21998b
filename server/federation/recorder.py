"""Where a job's progress goes: job.json in the job directory, and the server's registry.

job.json is what `offsite-admin jobs local run --json` prints and what a restarted job reads
back; the registry (when the job has a registry URL) is what the server's job watch RPC
streams. A deployed ServerApp runs inside Flower's process, not ours, so it writes to the
registry itself rather than returning results through Flower.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .checkpoint import JOB_FILE, write_json_atomic
from .config import FederationConfig

log = logging.getLogger(__name__)


class JobRecorder:
    def __init__(self, cfg: FederationConfig, engine: str = ""):
        self.cfg = cfg
        self.path = Path(cfg.job_dir) / JOB_FILE
        self.job = {
            "id": cfg.job_id,
            "model": cfg.model,
            "engine": engine,
            "status": "running",
            "config": {k: v for k, v in cfg.to_run_config().items()},
            "rounds": [],
            "release": None,
            "privacy": None,
            "started_at": time.time(),
        }
        self.registry = _registry_mirror(cfg)
        self.on_round = None  # optional callback(record): progress bars in the CLI

    def resume(self, rounds: list[dict], extra: dict) -> None:
        self.job["rounds"] = list(rounds)
        self.job["resumed_from_round"] = rounds[-1]["round"] if rounds else 0
        if extra.get("plugin_ppl_initial") is not None:
            self.job["plugin_ppl_initial"] = extra["plugin_ppl_initial"]
        self._write()

    def start(self, **info) -> None:
        self.job.update(info)
        self._write()
        if self.registry:
            self.registry.job_started(self.job)

    def round(self, record: dict) -> None:
        self.job["rounds"].append(record)
        if record.get("epsilon") is not None:
            self.job["privacy"] = {
                "epsilon": record["epsilon"],
                "delta": self.cfg.dp_delta,
                "noise_multiplier": self.cfg.dp_noise_multiplier,
                "clipping_norm": self.cfg.dp_clipping_norm,
            }
        self._write()
        if self.registry:
            self.registry.round_done(self.cfg.job_id, record)
        if self.on_round is not None:
            self.on_round(record)

    def release(self, release: dict) -> None:
        if self.registry:  # first, so job.json carries the registry's release id
            self.registry.release_created(self.cfg.job_id, release)
        self.job["release"] = release
        self.job["status"] = "completed"
        self.job["finished_at"] = time.time()
        try:
            from .report import plot_rounds

            figure = plot_rounds(self.job, self.path.parent / "report.png")
            self.job["report_png"] = str(figure) if figure else None
        except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished job
            log.warning("job %s: could not plot the report: %s", self.cfg.job_id, e)
        self._write()
        if self.registry:
            self.registry.job_finished(self.cfg.job_id, "completed", "")

    def failed(self, error: str) -> None:
        self.job["status"] = "failed"
        self.job["error"] = error
        self._write()
        if self.registry:
            try:
                self.registry.job_finished(self.cfg.job_id, "failed", error)
            except Exception as e:  # noqa: BLE001 - the job's own error is the one to raise
                log.warning("could not mark job %s failed in the registry: %s", self.cfg.job_id, e)

    def _write(self) -> None:
        write_json_atomic(self.path, self.job)


def _registry_mirror(cfg: FederationConfig):
    if not cfg.registry_url:
        return None
    from .registry_link import RegistryLink

    return RegistryLink(cfg.registry_url, cfg.artifacts_root)
