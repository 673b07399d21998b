"""After the last round: plug the adapter into the full model and record a candidate.

The candidate is never released from here: it gets status `pending-gate`, and only the
safety gate may move it on. The adapter-only artifact and the plugged-in model directory
are both written atomically (temp path, fsync, rename).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from offsite.emulators.adapter import save_adapter
from offsite.emulators.plugin import export_model_dir, plug_in
from offsite.files import sha256_file
from offsite.server.artifacts import ArtifactStore

from .evaluate import PluginEvaluator

PENDING_GATE = "pending-gate"


@torch.no_grad()
def export_candidate(evaluator: PluginEvaluator, adapter: dict[str, np.ndarray], adapter_meta: dict, out: Path) -> Path:
    """The plugged-in full model as a Hugging Face directory at `out` (atomic)."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in adapter.items()}
    model = plug_in(evaluator.loaded, state, adapter_meta)
    # Built beside `out` and swapped in whole (offsite.files.atomic_dir): never a moment without it.
    return export_model_dir(model, evaluator.loaded.tokenizer, out, overwrite=True)


def make_candidate(
    *,
    job_id: str,
    job_dir: Path,
    evaluator: PluginEvaluator,
    adapter: dict[str, np.ndarray],
    base_digest: str,
    model: str,
    rounds: int,
    plugin_ppl: float | None,
    candidate_dir: str = "",
    artifacts_root: str = "",
) -> dict:
    """Write the final adapter and the plugged-in model; return the release record (pending-gate)."""
    adapter_path = save_adapter(
        job_dir / "final-adapter.safetensors",
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in adapter.items()},
        base_digest,
        job_id=job_id,
        rounds=str(rounds),
        base_model=model,
    )
    meta = {"base_model_digest": base_digest, "job_id": job_id}
    model_dir = export_candidate(
        evaluator, adapter, meta, Path(candidate_dir) if candidate_dir else job_dir / "candidate"
    )
    adapter_sha = sha256_file(adapter_path)
    if artifacts_root:
        adapter_sha = ArtifactStore(artifacts_root).put_file(adapter_path)
    return {
        "id": f"{job_id}-candidate",
        "job_id": job_id,
        "status": PENDING_GATE,
        "base_model": model,
        "base_digest": base_digest,
        "adapter_path": str(adapter_path),
        "adapter_sha256": adapter_sha,
        "model_dir": str(model_dir),
        "plugin_ppl": plugin_ppl,
        "created_at": time.time(),
    }
