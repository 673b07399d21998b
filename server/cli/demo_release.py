"""The demo's second half: federated rounds on the demo's bundle, then the safety gate.

7/8 federation: N simulated data owners (non-IID python-reference shards) each train the
    bundle's adapter with the client engine, R rounds in Flower's Simulation Engine, FedAvg;
    the last round's adapter becomes a candidate release (status pending-gate) in the
    demo's own registry (SQLite under WORK/federation).
8/8 gate: the candidate against the base model on the safety suites (all items by default:
    the default policy blocks a capped run), scorecard and policy; the release is approved only on a pass, blocked
    otherwise (fail closed). The report is written as HTML, Markdown and JSON.

Both stages resume: a finished job is reused when its settings match, and the eval runner
caches generations, so a re-run after an interruption repeats little.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass
class RoundsConfig:
    clients: int = 2
    rounds: int = 2
    local_steps: int = 10
    lr: float = 1e-4
    scheme: str = "full"
    heldout_limit: int = 16  # held-out blocks for the server's per-round plug-in perplexity
    eval_limit: int = 0  # items per safety suite (0: every item; a capped run never passes the gate)
    suites: tuple[str, ...] = ()  # suites or categories at the gate (empty: all)


def _federation_settings(cfg: RoundsConfig) -> dict:
    """What a finished job must match to be reused (the gate's settings do not matter to it)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("eval_limit", "suites")}


def _finished_job(fed_dir: Path, cfg: RoundsConfig, bundle_sha: str) -> dict | None:
    marker = fed_dir / "demo-job.json"
    if not marker.exists():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("config") != _federation_settings(cfg) or saved.get("bundle_manifest_sha256") != bundle_sha:
        return None
    job = json.loads(Path(saved["job_json"]).read_text()) if Path(saved["job_json"]).exists() else None
    return job if job and job.get("status") == "completed" and job.get("release") else None


def run_federation(work_dir: Path, model: str, bundle_dir: Path, pub_path: Path, cfg: RoundsConfig,
                   log: Callable[[str], None]) -> dict:
    """Stage 7: the rounds; returns the finished job record (rounds, release)."""
    from offsite.emulators.bundle import sha256_bytes
    from offsite.server.federation.job_runner import prepare_local_job, quiet_flower, run_simulation_job

    fed_dir = work_dir / "federation"
    bundle_sha = sha256_bytes((bundle_dir / "manifest.json").read_bytes())
    job = _finished_job(fed_dir, cfg, bundle_sha)
    if job is not None:
        log(f"7/8 federation: reusing job {job['id']} ({len(job['rounds'])} rounds)")
        return job
    quiet_flower()
    local = prepare_local_job(fed_dir, model, cfg.clients, cfg.rounds, bundle=str(bundle_dir), public_key=str(pub_path),
                              local_steps=cfg.local_steps, lr=cfg.lr, scheme=cfg.scheme, batch_size=4, block_size=256,
                              heldout_limit=cfg.heldout_limit, min_clients=cfg.clients)
    log(f"7/8 federation: job {local.cfg.job_id}, {cfg.clients} data owners x {cfg.rounds} rounds of "
        f"{cfg.local_steps} local steps (Flower simulation, FedAvg) ...")
    t = time.time()

    def on_round(record: dict) -> None:
        ppl = record.get("plugin_ppl")
        log(f"    round {record['round']}: {len(record['clients'])} clients" + (f", plug-in ppl {ppl:.2f}" if ppl else ""))

    job = run_simulation_job(local, on_round=on_round)
    if job.get("status") != "completed" or not job.get("release"):
        raise RuntimeError(f"federated job {local.cfg.job_id} did not complete: {job.get('error') or job.get('status')}")
    (fed_dir / "demo-job.json").write_text(json.dumps({
        "config": _federation_settings(cfg), "bundle_manifest_sha256": bundle_sha,
        "job_json": str(Path(local.cfg.job_dir) / "job.json")}, indent=1))
    log(f"7/8 federation: done in {time.time() - t:.0f} s; candidate release {job['release']['id']} (pending-gate)")
    return job


def run_gate(work_dir: Path, model: str, job: dict, cfg: RoundsConfig, log: Callable[[str], None],
             progress: bool = True) -> dict:
    """Stage 8: evaluate the candidate against the base; approve on a pass, block otherwise."""
    from offsite.safety_evals.runner import run_eval
    from offsite.server.registry import Registry

    release = job["release"]
    out = work_dir / "gate"
    which = ", ".join(cfg.suites) if cfg.suites else "every suite"
    log(f"8/8 safety gate: candidate vs {model} on {which} ({cfg.eval_limit or 'all'} items each) ...")
    t = time.time()
    report = run_eval(candidate=release["model_dir"], base=model, suites=list(cfg.suites) or None,
                      limit=cfg.eval_limit or None, out_dir=out, progress=progress, cache_dir=work_dir / "gate-cache")
    gate = report.get("gate") or {}
    verdict = gate.get("verdict") or "block"  # no verdict: the evaluation is incomplete, fail closed
    registry = Registry(f"sqlite:///{work_dir / 'federation' / 'registry.db'}")
    try:
        status = "approved" if verdict == "pass" else "blocked"
        registry.update_release(release["id"], gate_verdict=verdict, status=status, decided_by="offsite-admin demo",
                                reason="safety gate passed" if verdict == "pass" else "; ".join(gate.get("reasons", []))[:500])
    finally:
        registry.close()
    log(f"8/8 safety gate: {verdict} (overall level {report.get('overall_level')}) in {time.time() - t:.0f} s; "
        f"release {release['id']} is {status}; report {out / 'report.html'}")
    return {"verdict": verdict, "release_status": status, "overall_level": report.get("overall_level"),
            "reasons": gate.get("reasons", []), "report": str(out / "report.html"),
            "categories": {c.get("name"): c.get("level") for c in report.get("categories", []) if isinstance(c, dict)}}


def run_rounds_and_gate(work_dir: Path, model: str, bundle_dir: Path, pub_path: Path, cfg: RoundsConfig,
                        log: Callable[[str], None], progress: bool = True) -> dict:
    job = run_federation(work_dir, model, bundle_dir, pub_path, cfg, log)
    gate = run_gate(work_dir, model, job, cfg, log, progress)
    rounds = [{"round": r["round"], "clients": len(r["clients"]), "plugin_ppl": r.get("plugin_ppl")} for r in job["rounds"]]
    return {"job_id": job["id"], "rounds": rounds, "release": {"id": job["release"]["id"], "status": gate["release_status"],
            "model_dir": job["release"]["model_dir"]}, "gate": gate}
