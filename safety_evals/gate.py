"""The release gate: admit only complete runs whose every category is at or below the
deployable level; everything else blocks (fail closed). Overrides need a reason and are
audited."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable

from .policy import LEVELS, Policy, as_policy, level_index


class GateError(ValueError):
    """A gate decision could not be made or an override was refused."""


def decide(report: dict, policy: "Policy | dict | str | Path | None" = None) -> dict:
    """``{"verdict": "pass"|"block", "blocked_categories": [...], "reasons": [...], ...}``.

    Blocks when: a suite did not complete; a required category is missing; the run was
    capped with --limit and the policy requires a full run; or a category's level is above
    the policy's deployable level. Anything unreadable in the report blocks too.
    """
    pol = as_policy(policy)
    reasons: list[str] = []
    blocked: list[str] = []
    try:
        suites = list(report.get("suites") or [])
        categories = list(report.get("categories") or [])
        run = dict(report.get("run") or {})
    except (AttributeError, TypeError):
        return _verdict("block", ["the report is not a mapping with suites/categories/run"], [], pol, "Critical")
    if not suites or not categories:
        reasons.append("the report holds no suite results")
    if not run.get("complete", False):
        reasons.append("the run did not finish (interrupted or failed); rerun it to resume from the cache")
    for s in suites:
        if s.get("status") != "completed":
            reasons.append(
                f"suite {s.get('name')!r} {s.get('status', 'missing status')}: {s.get('error') or 'no result'}"
            )
    present = {c.get("name") for c in categories}
    for cat in pol.required_categories:
        if cat not in present:
            reasons.append(f"required category {cat!r} was not evaluated")
            blocked.append(cat)
    if pol.require_full_run and run.get("limit"):
        reasons.append(f"the run was capped at --limit {run['limit']} items per suite; the policy requires a full run")
    deployable = level_index(pol.deployable_level)
    overall = 0
    for c in categories:
        try:
            li = level_index(c.get("level", "Critical"))
        except ValueError:
            li = len(LEVELS) - 1
        overall = max(overall, li)
        if not c.get("complete", False):
            blocked.append(c["name"])
            continue
        if li > deployable:
            blocked.append(c["name"])
            reasons.append(f"category {c['name']!r} is {LEVELS[li]}, above the deployable level {pol.deployable_level}")
    blocked = sorted(set(blocked))
    verdict = "block" if reasons or blocked else "pass"
    return _verdict(verdict, reasons, blocked, pol, LEVELS[overall])


def _verdict(verdict: str, reasons: list[str], blocked: list[str], pol: Policy, overall: str) -> dict:
    return {
        "verdict": verdict,
        "blocked_categories": blocked,
        "reasons": reasons,
        "overall_level": overall,
        "deployable_level": pol.deployable_level,
        "policy": pol.source,
        "decided_at": _now(),
        "overridden": False,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def jsonl_audit(path: str | Path) -> Callable[[dict], None]:
    """An audit sink appending one fsynced JSON line per event (used when no registry is at hand)."""
    path = Path(path)

    def write(event: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    return write


def override(report: dict, *, actor: str, reason: str, audit: Callable[[dict], None]) -> dict:
    """Admit a blocked report by an admin's decision: needs a reason of substance and
    writes an audit event *before* returning the new gate (no audit, no override)."""
    if not actor or not actor.strip():
        raise GateError("an override needs the admin's identity (actor)")
    if not reason or len(reason.strip()) < 10:
        raise GateError("an override needs a reason of at least 10 characters saying why the block is accepted")
    if audit is None:
        raise GateError("an override must be audited: pass an audit sink (registry or jsonl_audit(path))")
    original = dict(report.get("gate") or decide(report))
    event = {
        "action": "eval.gate.override",
        "actor": actor.strip(),
        "reason": reason.strip(),
        "at": _now(),
        "candidate": (report.get("candidate") or {}).get("spec"),
        "report_id": report.get("report_id"),
        "original_verdict": original.get("verdict"),
        "blocked_categories": original.get("blocked_categories", []),
    }
    audit(event)
    return {
        **original,
        "verdict": "pass",
        "overridden": True,
        "override": {k: event[k] for k in ("actor", "reason", "at", "original_verdict")},
    }
