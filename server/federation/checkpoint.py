"""Per-round persistence of a federated job, so a restarted server resumes.

After each round the aggregated adapter is written (atomically) first and the job's
state file second; the state file names the last round whose adapter is on disk, so a
crash between the two leaves a consistent state one round behind, never a state that
points at a half-written adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from offsite.emulators.adapter import load_adapter, save_adapter
from offsite.files import atomic_write_json as write_json_atomic

STATE_FILE = "state.json"
JOB_FILE = "job.json"


class JobCheckpoint:
    def __init__(self, job_dir: str | Path, job_id: str):
        self.dir = Path(job_dir)
        self.job_id = job_id
        self.dir.mkdir(parents=True, exist_ok=True)

    def adapter_path(self, server_round: int) -> Path:
        return self.dir / "adapters" / f"round-{server_round:04d}.safetensors"

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def load(self) -> dict | None:
        """The saved state ({"last_round", "rounds", "extra"}) or None for a fresh job."""
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("job_id") != self.job_id:
            raise RuntimeError(
                f"{self.state_path} belongs to job {state.get('job_id')!r}, not {self.job_id!r}; "
                "use a fresh --data-dir/job directory per job"
            )
        return state

    def load_adapter(self, server_round: int) -> dict[str, np.ndarray]:
        state, _ = load_adapter(self.adapter_path(server_round))
        return {k: v.to(torch.float32).numpy() for k, v in state.items()}

    def save_round(
        self, server_round: int, arrays: dict[str, np.ndarray], base_digest: str, rounds: list[dict], extra: dict
    ) -> Path:
        path = save_adapter(
            self.adapter_path(server_round),
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
            base_digest,
            job_id=self.job_id,
            round=str(server_round),
        )
        write_json_atomic(
            self.state_path,
            {"job_id": self.job_id, "last_round": server_round, "adapter": str(path), "rounds": rounds, "extra": extra},
        )
        return path

    def mark_released(self, release: dict) -> None:
        """Record the candidate release in the state file, so a restart does not make another."""
        state = self.load() or {"job_id": self.job_id, "last_round": 0, "rounds": [], "extra": {}}
        state["release"] = release
        write_json_atomic(self.state_path, state)
