"""The safety gate on the server: eval runs as operations, and the rules for a release's verdict.

A release is compared with its own job's base model (a request cannot pick another). A block
always applies (fail closed); a pass replaces a verdict only from a complete run (every
suite, no --limit) under the same or a stricter policy than every earlier deciding run.
Every run stays in the release's history (its eval reports, and a "gate" job event).
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from pathlib import Path

from offsite.files import extract_tar

from .hooks import load_hook
from .operations import OperationContext, OperationResult
from .registry import NotFound
from .state import ServerState


def start_eval(
    state: ServerState,
    candidate: str,
    base: str = "",
    suites: list[str] | None = None,
    limit: int = 0,
    created_by: str = "",
    schedule_id: str = "",
):
    """Start an eval run as an operation (the RunEval RPC and the eval scheduler both use this).

    `candidate` is a release id (its adapter is plugged into its base model first) or a
    model id/name. The report's files become artifacts; a pending or blocked release gets
    the gate's verdict (pass keeps it pending for an admin's approval; block blocks it).
    """
    reg = state.registry
    release = None
    if candidate.startswith("rel_"):
        release = reg.get_release(candidate)
        cand_model = reg.get_model(release.model_id)
        base_model = gate_base_model(state, release, base)
    else:
        cand_model = reg.get_model(candidate)
        base_model = reg.get_model(base) if base else cand_model
    complete_scope = not suites and not limit
    # A merged release's report names what it was merged from (and how).
    lineage = (
        {"lineage": {"parents": list(release.parent_ids), "merge": (release.metrics or {}).get("merge", {})}}
        if release is not None and release.parent_ids
        else {}
    )
    runner = load_hook(state.config.eval_runner)
    exporter = load_hook(state.config.release_exporter) if release is not None else None

    def work(ctx: OperationContext) -> OperationResult:
        tmp = Path(tempfile.mkdtemp(prefix=f"eval-{ctx.op_id}-", dir=state.work_dir))
        try:
            base_src = state.resolve_model_source(base_model.source)
            if release is not None:
                ctx.progress(0.02, "preparing the candidate model")
                cand_dir = tmp / "candidate"
                if release.export_sha256:
                    # An uncompressed tar unpacks to no more than its own size.
                    extract_tar(
                        state.store.path(release.export_sha256),
                        cand_dir,
                        max_bytes=state.store.size(release.export_sha256),
                    )
                else:
                    exporter(
                        state.resolve_model_source(cand_model.source),
                        state.store.path(release.adapter_sha256),
                        cand_dir,
                    )
                cand_src = str(cand_dir)
            else:
                cand_src = state.resolve_model_source(cand_model.source)
            ctx.progress(0.1, "running the suites")
            out = tmp / "report"
            extra = {}
            params = inspect.signature(runner).parameters  # an admin's hook may take fewer
            if "cache_dir" in params:
                # Generations cached across runs: a re-run after a crash or a cancel resumes.
                extra["cache_dir"] = state.data_dir / "eval-cache"
            if release is not None and "previous_report" in params:
                # What changed since the model's previous release (new failures first in the report).
                extra["previous_report"] = previous_release_report(state, release)
            report = runner(
                candidate=cand_src,
                base=base_src,
                suites=suites or None,
                limit=limit or None,
                out_dir=out,
                progress=False,
                **extra,
            )
            ctx.check_cancelled()
            shas = {}
            for name in ("report.json", "report.html", "report.md", "samples.jsonl"):
                if (out / name).is_file():
                    shas[name] = state.store.put_file(out / name)
                    reg.add_artifact(shas[name], state.store.size(shas[name]), "eval-report", name)
            if "report.json" not in shas:
                shas["report.json"] = state.store.put_bytes(json.dumps(report, default=str).encode())
                reg.add_artifact(
                    shas["report.json"], state.store.size(shas["report.json"]), "eval-report", "report.json"
                )
            gate = report.get("gate") or {}
            verdict = gate.get("verdict") or "block"  # no verdict = incomplete = fail closed
            categories = [
                {"name": c.get("name", ""), "level": c.get("level", "")}
                for c in report.get("categories", [])
                if isinstance(c, dict)
            ]
            scope = {
                "suites": list(suites or []),
                "limit": int(limit or 0),
                "complete": complete_scope and bool((report.get("run") or {}).get("complete")),
            }
            row = reg.add_eval_report(
                candidate=candidate,
                base=base_model.name,
                verdict=verdict,
                categories=categories,
                report_json_sha256=shas["report.json"],
                report_html_sha256=shas.get("report.html", ""),
                summary={"gate": gate, "artifacts": shas, "scope": scope, **lineage},
                release_id=release.id if release else "",
                schedule_id=schedule_id,
                operation_id=ctx.op_id,
            )
            applied, why = False, "not a release"
            if release is not None:
                complete = complete_scope and bool((report.get("run") or {}).get("complete"))
                applied, why = _apply_verdict(reg, release.id, row, verdict, gate, complete)
            return OperationResult(
                resource=f"eval-reports/{row.id}",
                result={"report_id": row.id, "verdict": verdict, "verdict_applied": applied, "why": why},
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return state.ops.start("eval-run", work, created_by=created_by)


_LEVELS = ("Low", "Medium", "High", "Critical")


def previous_release_report(state: ServerState, release) -> dict | None:
    """The latest report.json of the newest earlier release of the same base model, if any."""
    reg = state.registry
    earlier = [
        r
        for r in reg.list_releases()
        if r.model_id == release.model_id and r.id != release.id and r.created_at <= release.created_at
    ]
    for prev in reversed(earlier):
        reports = reg.list_eval_reports(release_id=prev.id, limit=1)
        if reports and reports[0].report_json_sha256:
            try:
                with state.store.open(reports[0].report_json_sha256) as fh:
                    return json.loads(fh.read())
            except (OSError, ValueError):
                return None  # a missing or unreadable report: no diff, never a failed gate
    return None


def gate_base_model(state: ServerState, release, asked: str = ""):
    """The gate compares a release with its own job's base model; a request cannot pick another."""
    reg = state.registry
    model_id = release.model_id
    if release.job_id:
        try:
            model_id = reg.get_job(release.job_id).model_id or model_id
        except NotFound:
            pass
    fixed = reg.get_model(model_id)
    if asked:
        other = reg.get_model(asked)
        if other.id != fixed.id:
            raise ValueError(
                f"release {release.id} is gated against its job's base model {fixed.name!r}; "
                f"another base ({other.name[:64]!r}) is not accepted: drop --base"
            )
    return fixed


def _level(gate: dict) -> int:
    try:
        return _LEVELS.index(str(gate.get("deployable_level") or "Medium"))
    except ValueError:
        return len(_LEVELS)  # unknown = the most permissive, so it never counts as stricter


def _as_strict(new: dict, old: dict) -> bool:
    """Is the policy behind gate result `new` the same as, or stricter than, `old`'s?"""
    if _level(new) < _level(old):
        return True
    return _level(new) == _level(old) and (new.get("policy") or "default") == (old.get("policy") or "default")


def _apply_verdict(reg, release_id: str, report, verdict: str, gate: dict, complete: bool) -> tuple[bool, str]:
    """Record a run's verdict on its release when the rules allow; every run stays in the history.

    A block always applies (fail closed). A pass replaces the release's verdict only when the
    run was complete (every suite, no --limit) and its policy is the same as or stricter than
    that of every earlier run that decided this release."""
    earlier = [
        r
        for r in reg.list_eval_reports(release_id=release_id)
        if r.id != report.id and (r.summary or {}).get("applied")
    ]
    why = "applied"
    if verdict == "pass":
        if not complete:
            why = "a partial run (suite subset or --limit) cannot pass a release; it is kept in the history only"
        else:
            weaker = [r.id for r in earlier if not _as_strict(gate, (r.summary or {}).get("gate") or {})]
            if weaker:
                why = f"this run's policy is less strict than that of {', '.join(weaker)}; kept in the history only"
    applied = why == "applied"
    reg.update_eval_report_summary(report.id, applied=applied, why=why)
    release = reg.get_release(release_id)
    if applied:
        fields = {"gate_report_id": report.id, "gate_verdict": verdict}
        if release.status in ("pending-gate", "blocked"):
            fields["status"] = "pending-gate" if verdict == "pass" else "blocked"
        reg.update_release(release_id, **fields)
    if release.job_id:
        reg.add_job_event(
            release.job_id,
            "gate",
            {"release_id": release_id, "report_id": report.id, "verdict": verdict, "applied": applied, "why": why},
        )
    return applied, why


def earlier_blocks(reg, release) -> list[str]:
    """Reports that blocked this release before its current (passing) verdict."""
    return [
        r.id
        for r in reg.list_eval_reports(release_id=release.id)
        if r.verdict != "pass" and (r.summary or {}).get("applied") and r.id != release.gate_report_id
    ]
