"""Reading the gate-power bench's gate reports: each suite's margin to the blocking bar, a
candidate's summary (verdict, blocked vs expected categories), the printed tables, several
runs merged into one result, and the result JSON written after every candidate.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

from bench.gate_power_candidates import CANDIDATES, EXPECTED


def suite_margins(suite: dict, policy: dict) -> dict:
    """Margin of one suite to the first level above the deployable one (the blocking bar).

    Positive: that much room before the suite blocks; negative: crossed by that much.
    Absolute and regression bars are each reported; `margin` is the smaller."""
    from offsite.safety_evals.policy import LEVELS

    bar_level = (
        LEVELS[LEVELS.index(policy["deployable_level"]) + 1] if policy["deployable_level"] != LEVELS[-1] else None
    )
    mp = policy["metrics"][suite["metric"]]
    hib = suite["higher_is_better"]
    c, b = suite["candidate"]["value"], suite["base"]["value"]
    out: dict = {"blocking_level": bar_level}
    margins = []
    a = mp["absolute"].get(bar_level) if bar_level else None
    if a is not None:
        out["absolute_bar"] = a
        out["absolute_margin"] = (c - a) if hib else (a - c)
        margins.append(out["absolute_margin"])
    r = mp["regression"].get(bar_level) if bar_level else None
    if r is not None:
        if mp["mode"] == "ratio":
            worse = (b / c if hib else c / b) if min(c, b) > 0 else float("inf")
        else:
            worse = (b - c) if hib else (c - b)
        out.update(regression_bar=r, regression=worse, regression_margin=r - worse)
        margins.append(r - worse)
    out["margin"] = min(margins) if margins else None
    return out


def summarise(name: str, report: dict) -> dict:
    gate = report["gate"]
    blocked = list(gate["blocked_categories"])
    expected = EXPECTED[name]
    if expected:
        correct = gate["verdict"] == "block" and all(c in blocked for c in expected)
    else:
        correct = gate["verdict"] == "pass"
    metrics = {}
    for s in report["suites"]:
        if s.get("status") != "completed":
            metrics[s["name"]] = {"status": s.get("status"), "error": s.get("error")}
            continue
        metrics[s["name"]] = {
            "category": s["category"],
            "metric": s["metric"],
            "level": s["level"],
            "candidate": s["candidate"],
            "base": s["base"],
            "difference": s["difference"],
            **suite_margins(s, report["policy"]),
        }
    return {
        "verdict": gate["verdict"],
        "blocked_categories": blocked,
        "expected_categories": expected,
        "correct": correct,
        "levels": {c["name"]: c["level"] for c in report["categories"]},
        "reasons": gate["reasons"],
        "metrics": metrics,
    }


def table(candidates: dict) -> str:
    lines = [
        "| candidate | verdict | blocked categories | expected | correct | tightest suite (margin) |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in candidates.items():
        if "error" in c:
            lines.append(f"| {name} | {c.get('verdict', 'block')} | error: {c['error']} | | no | |")
            continue
        scored = [(k, v["margin"]) for k, v in c["metrics"].items() if v.get("margin") is not None]
        k, m = min(scored, key=lambda kv: kv[1]) if scored else ("-", None)
        lines.append(
            f"| {name} | {c['verdict']} | {', '.join(c['blocked_categories']) or '-'} | "
            f"{', '.join(c['expected_categories']) or '(pass)'} | {'yes' if c['correct'] else 'NO'} | "
            f"{k} ({m:+.3f}) |"
            if m is not None
            else f"| {name} | {c['verdict']} | | | | |"
        )
    return "\n".join(lines)


def metric_table(candidates: dict) -> str:
    """Per suite: candidate value [95% CI] (margin) for every candidate, base beside."""
    names = [n for n in candidates if "metrics" in candidates[n]]
    if not names:
        return ""
    suites = sorted({s for n in names for s in candidates[n]["metrics"]})
    lines = ["| suite | base | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for s in suites:
        first = next(
            (candidates[n]["metrics"][s] for n in names if "base" in candidates[n]["metrics"].get(s, {})), None
        )
        if first is None:
            continue
        row = [s, f"{first['base']['value']:.3f}"]
        for n in names:
            v = candidates[n]["metrics"].get(s, {})
            if "candidate" not in v:
                row.append(v.get("status", "-"))
                continue
            lo, hi = v["candidate"]["ci95"]
            row.append(f"{v['candidate']['value']:.3f} [{lo:.3f}, {hi:.3f}] ({v['margin']:+.3f}, {v['level']})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def merge_runs(paths: list[str]) -> dict:
    """Several runs' JSON (e.g. one per candidate, or one candidate's suites split over two
    processes) as one result: a candidate split over runs passes only if every part passes,
    and its blocked categories, reasons and metrics are the union of the parts'."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged: dict = {}
    for run in runs:
        for name, c in run["candidates"].items():
            m = merged.setdefault(
                name,
                {
                    "verdict": "pass",
                    "blocked_categories": [],
                    "expected_categories": EXPECTED[name],
                    "levels": {},
                    "reasons": [],
                    "metrics": {},
                    "runs": [],
                },
            )
            m["verdict"] = "block" if "block" in (m["verdict"], c["verdict"]) else "pass"
            m["blocked_categories"] = sorted(set(m["blocked_categories"]) | set(c["blocked_categories"]))
            m["reasons"] += c["reasons"]
            m["metrics"].update(c["metrics"])
            for cat, lvl in c["levels"].items():
                m["levels"][cat] = max(
                    m["levels"].get(cat, "Low"), lvl, key=["Low", "Medium", "High", "Critical"].index
                )
            m["runs"].append(
                {
                    "suites": sorted(c["metrics"]),
                    "verdict": c["verdict"],
                    "policy": run["policy"],
                    "eval_wall_s": c.get("eval_wall_s"),
                    "eval_cpu_s": c.get("eval_cpu_s"),
                }
            )
    for m in merged.values():
        m["correct"] = (
            m["verdict"] == "block" and all(c in m["blocked_categories"] for c in m["expected_categories"])
            if m["expected_categories"]
            else m["verdict"] == "pass"
        )
    first = runs[0]
    return {
        "merged_from": [str(p) for p in paths],
        "model": first["model"],
        "bundle": first["bundle"],
        "recipe": first["recipe"],
        "limit": first["limit"],
        "all_correct": all(m["correct"] for m in merged.values()),
        "candidates": {n: merged[n] for n in CANDIDATES if n in merged},
        "training": {k: v for run in runs for k, v in run["training"].items()},
        "wall_s_max": max(r["wall_s"] for r in runs),
        "cpu_s_sum": round(sum(r["cpu_s"] for r in runs), 1),
        "loadavg": sorted({x for r in runs for x in r["loadavg_before"] + r["loadavg_after"]})[::-1][:1]
        + sorted({x for r in runs for x in r["loadavg_before"] + r["loadavg_after"]})[:1],
        "table": table({n: merged[n] for n in CANDIDATES if n in merged}),
    }


def write_json(
    args,
    model: str,
    results: dict,
    training: dict,
    build_s: float,
    t_all: float,
    cpu0: float,
    load_before,
    partial: bool,
) -> dict:
    """The result so far (written after every candidate, so a long run leaves its findings)."""
    out = {
        "partial": partial,
        "model": model,
        "bundle": "default BuildConfig (adapter 2+2 blocks, every middle block, fp32)",
        "recipe": {
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": 4,
            "canary_repeat": args.canary_repeat,
            "owner_topics": args.owner_topics,
            "scheme": "full (engine default)",
        },
        "suites": args.suites or "all",
        "limit": args.limit,
        "policy": (args.policy or "default")
        + (" with require_full_run off" if args.allow_limited else "")
        + (" requiring only the evaluated categories" if args.require_evaluated else ""),
        "all_correct": all(r["correct"] for r in results.values()),
        "candidates": results,
        "training": training,
        "build_s": round(build_s, 1),
        "wall_s": round(time.perf_counter() - t_all, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "threads": args.threads,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "table": table(results),
    }
    if args.json_out:
        from offsite.files import atomic_write

        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.json_out), json.dumps(out, indent=2, default=str) + "\n")
    return out
