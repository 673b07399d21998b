"""The demo's federated half (stages `federation` and `gate` of demo_stages.STAGES).

federation: N simulated data owners (non-IID python-reference shards) each train the bundle's
    adapter with the client engine, R rounds in Flower's Simulation Engine, FedAvg; the last
    round's adapter becomes a candidate release (status pending-gate) in the demo's own
    registry (SQLite under WORK/federation). A finished job with the same settings is reused.
gate: the candidate against the base model on the safety suites (every item by default: the
    default policy blocks a capped run); the release is approved only on a pass, blocked
    otherwise (fail closed). The eval runner caches generations, so a re-run repeats little.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .demo_stages import DemoRun

SCHEME = "full"


def _federation_settings(run: DemoRun) -> dict:
    """What a finished job must match to be reused (the gate's settings do not matter to it)."""
    c = run.cfg
    return {
        "clients": c.clients,
        "rounds": c.rounds,
        "local_steps": c.local_steps,
        "lr": c.lr,
        "scheme": SCHEME,
        "heldout_limit": c.eval_blocks or 16,
    }


def _finished_job(run: DemoRun, bundle_sha: str) -> dict | None:
    marker = run.fed_dir / "demo-job.json"
    if not marker.exists():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("config") != _federation_settings(run) or saved.get("bundle_manifest_sha256") != bundle_sha:
        return None
    job = json.loads(Path(saved["job_json"]).read_text()) if Path(saved["job_json"]).exists() else None
    return job if job and job.get("status") == "completed" and job.get("release") else None


def run_federation(run: DemoRun, say: Callable[[str], None]) -> dict:
    """The rounds; returns the finished job record (rounds, release)."""
    from offsite.emulators.bundle import sha256_bytes
    from offsite.server.federation.job_runner import prepare_local_job, quiet_flower, run_simulation_job

    bundle_sha = sha256_bytes((run.bundle_dir / "manifest.json").read_bytes())
    job = _finished_job(run, bundle_sha)
    if job is not None:
        say(f"      reusing job {job['id']} ({len(job['rounds'])} rounds)")
        return job
    quiet_flower()
    settings = _federation_settings(run)
    local = prepare_local_job(
        run.fed_dir,
        run.cfg.model,
        run.cfg.clients,
        run.cfg.rounds,
        bundle=str(run.bundle_dir),
        public_key=str(run.pub),
        local_steps=run.cfg.local_steps,
        lr=run.cfg.lr,
        scheme=SCHEME,
        batch_size=4,
        block_size=256,
        heldout_limit=settings["heldout_limit"],
        min_clients=run.cfg.clients,
    )
    say(
        f"      job {local.cfg.job_id}: {run.cfg.clients} data owners x {run.cfg.rounds} rounds of "
        f"{run.cfg.local_steps} local steps (`flwr run` on a local simulation SuperLink); "
        f"Flower and Ray write to {run.log}"
    )

    def on_round(record: dict) -> None:
        ppl = record.get("plugin_ppl")
        say(
            f"      round {record['round']}/{run.cfg.rounds}: {len(record['clients'])} data owners replied"
            + (f", plug-in perplexity {ppl:.2f}" if ppl else "")
        )

    job = run_simulation_job(local, on_round=on_round, log_path=run.log)
    if job.get("status") != "completed" or not job.get("release"):
        raise RuntimeError(
            f"federated job {local.cfg.job_id} did not complete: {job.get('error') or job.get('status')} "
            f"(details in {run.log})"
        )
    (run.fed_dir / "demo-job.json").write_text(
        json.dumps(
            {
                "config": settings,
                "bundle_manifest_sha256": bundle_sha,
                "job_json": str(Path(local.cfg.job_dir) / "job.json"),
            },
            indent=1,
        )
    )
    return job


def run_gate(run: DemoRun, release: dict) -> dict:
    """Evaluate the candidate against the base; approve on a pass, block otherwise."""
    from offsite.safety_evals.runner import run_eval
    from offsite.server.registry import Registry

    suites = list(run.cfg.gate_suites)
    run.say(f"      {', '.join(suites) if suites else 'every suite'}, {run.cfg.eval_limit or 'all'} items each")
    report = run_eval(
        candidate=release["model_dir"],
        base=run.cfg.model,
        suites=suites or None,
        limit=run.cfg.eval_limit or None,
        out_dir=run.gate_dir,
        progress=True,
        cache_dir=run.work_dir / "gate-cache",
    )
    gate = report.get("gate") or {}
    verdict = gate.get("verdict") or "block"  # no verdict: the evaluation is incomplete, fail closed
    status = "approved" if verdict == "pass" else "blocked"
    registry = Registry(f"sqlite:///{run.fed_dir / 'registry.db'}")
    try:
        registry.update_release(
            release["id"],
            gate_verdict=verdict,
            status=status,
            decided_by="offsite-admin demo",
            reason="safety gate passed" if verdict == "pass" else "; ".join(gate.get("reasons", []))[:500],
        )
    finally:
        registry.close()
    return {
        "verdict": verdict,
        "release_status": status,
        "overall_level": report.get("overall_level"),
        "reasons": gate.get("reasons", []),
        "report": str(run.gate_dir / "report.html"),
        "categories": {c.get("name"): c.get("level") for c in report.get("categories", []) if isinstance(c, dict)},
    }
