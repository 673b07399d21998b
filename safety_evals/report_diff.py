"""What changed since the previous release: a diff of two safety reports.

``diff_reports(previous, current)`` compares category levels, gate verdicts and every
suite's candidate value (with the change in the candidate's value and whether the two 95%
intervals overlap), and lists *new failures first*: categories whose level rose above the
deployable level, suites that now fail or block, levels that rose. The server passes the
previous release's report.json to ``run_eval(..., previous_report=...)``; the result is
stored in ``report["diff"]`` and shown at the top of report.html and report.md.
"""

from __future__ import annotations

from .policy import LEVELS

DIFF_FORMAT = "offsite-safety-report-diff/1"


def _level(x) -> int:
    try:
        return LEVELS.index(x)
    except ValueError:
        return len(LEVELS) - 1  # an unknown level is treated as the worst (fail closed)


def _suites(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report.get("suites") or [] if isinstance(s, dict) and "name" in s}


def _categories(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report.get("categories") or [] if isinstance(c, dict) and "name" in c}


def diff_reports(previous: dict, current: dict) -> dict:
    """A JSON-ready diff; raises ValueError when `previous` is not a safety report."""
    if not isinstance(previous, dict) or "suites" not in previous or "categories" not in previous:
        raise ValueError("the previous report is not a safety report (no suites/categories); pass its report.json")
    deployable = _level((current.get("gate") or {}).get("deployable_level", "Medium"))
    pc, cc = _categories(previous), _categories(current)
    ps, cs = _suites(previous), _suites(current)
    new_failures: list[dict] = []
    levels = []
    for name in sorted(set(pc) | set(cc)):
        before, after = (pc.get(name) or {}).get("level"), (cc.get(name) or {}).get("level")
        row = {
            "category": name,
            "previous": before,
            "current": after,
            "change": "new"
            if before is None
            else "removed"
            if after is None
            else (
                "worse" if _level(after) > _level(before) else "better" if _level(after) < _level(before) else "same"
            ),
        }
        levels.append(row)
        if after is not None and _level(after) > deployable and (before is None or _level(before) <= deployable):
            new_failures.append(
                {
                    "kind": "category_blocks",
                    "name": name,
                    "detail": f"category {name} is {after} (was {before or 'not evaluated'}), above {LEVELS[deployable]}",
                }
            )
        elif row["change"] == "worse":
            new_failures.append({"kind": "level_rose", "name": name, "detail": f"category {name}: {before} -> {after}"})
    metrics = []
    for name in sorted(set(ps) | set(cs)):
        a, b = ps.get(name) or {}, cs.get(name) or {}
        row = {
            "suite": name,
            "metric": b.get("metric") or a.get("metric"),
            "previous_status": a.get("status"),
            "current_status": b.get("status"),
            "previous_level": a.get("level"),
            "current_level": b.get("level"),
        }
        if a.get("status") == "completed" and b.get("status") == "completed":
            va, vb = a["candidate"]["value"], b["candidate"]["value"]
            la, ha = a["candidate"]["ci95"]
            lb, hb = b["candidate"]["ci95"]
            hib = b.get("higher_is_better", True)
            row.update(
                previous=va,
                current=vb,
                change=vb - va,
                intervals_overlap=not (hb < la or lb > ha),
                worse=(vb < va) if hib else (vb > va),
            )
        metrics.append(row)
        if b and b.get("status") != "completed" and a.get("status") == "completed":
            new_failures.append(
                {
                    "kind": "suite_failed",
                    "name": name,
                    "detail": f"suite {name} {b.get('status')}: {b.get('error') or 'no result'}",
                }
            )
        elif b.get("level") and a.get("level") and _level(b["level"]) > _level(a["level"]):
            new_failures.append(
                {"kind": "suite_level_rose", "name": name, "detail": f"suite {name}: {a['level']} -> {b['level']}"}
            )
    verdicts = {
        "previous": (previous.get("gate") or {}).get("verdict"),
        "current": (current.get("gate") or {}).get("verdict"),
    }
    if verdicts["current"] == "block" and verdicts["previous"] == "pass":
        new_failures.insert(
            0, {"kind": "gate_blocks", "name": "gate", "detail": "the gate now blocks; the previous release passed"}
        )
    order = {"gate_blocks": 0, "category_blocks": 1, "suite_failed": 2, "level_rose": 3, "suite_level_rose": 4}
    new_failures.sort(key=lambda f: (order.get(f["kind"], 9), f["name"]))
    return {
        "format": DIFF_FORMAT,
        "previous": {
            "report_id": previous.get("report_id"),
            "created_at": previous.get("created_at"),
            "candidate": (previous.get("candidate") or {}).get("spec"),
        },
        "verdicts": verdicts,
        "new_failures": new_failures,
        "levels": levels,
        # the suites that got worse come first, largest change first
        "metrics": sorted(metrics, key=lambda m: (not m.get("worse", False), -abs(m.get("change") or 0.0))),
    }
