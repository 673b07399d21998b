"""Report files: report.json, samples.jsonl, report.html (one self-contained page) and report.md.

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
half-written report that a reader (or the gate) could mistake for a finished one.
report.json is written last: its presence means the other files are complete.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from .policy import LEVELS
from offsite.files import atomic_write

TEMPLATE_DIR = Path(__file__).parent / "templates"
LEVEL_COLOURS = {"Low": "#2e7d32", "Medium": "#f9a825", "High": "#ef6c00", "Critical": "#c62828"}


def category_plot_png(category: dict, suites: list[dict]) -> str:
    """Candidate vs base per suite of a category, with 95% intervals, as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in suites if s.get("status") == "completed"]
    fig, axes = plt.subplots(1, max(1, len(done)), figsize=(3.2 * max(1, len(done)), 2.8), squeeze=False)
    for ax, s in zip(axes[0], done):
        vals = [s["candidate"]["value"], s["base"]["value"]]
        cis = [s["candidate"]["ci95"], s["base"]["ci95"]]
        err = [[max(0.0, v - c[0]) for v, c in zip(vals, cis)], [max(0.0, c[1] - v) for v, c in zip(vals, cis)]]
        ax.bar(
            ["candidate", "base"], vals, yerr=err, capsize=6, color=[LEVEL_COLOURS.get(s["level"], "#555"), "#90a4ae"]
        )
        arrow = "higher is better" if s["higher_is_better"] else "lower is better"
        ax.set_title(f"{s['name']}\n{s['metric']} ({arrow})", fontsize=8)
        ax.tick_params(labelsize=8)
    if not done:
        axes[0][0].text(0.5, 0.5, "no completed suite", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.suptitle(f"{category['name']}: {category['level']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(report: dict, samples: list[dict], max_samples_per_suite: int = 200) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = _fmt
    by_name = {s["name"]: s for s in report["suites"]}
    plots = {c["name"]: category_plot_png(c, [by_name[n] for n in c["suites"]]) for c in report["categories"]}
    by_suite: dict[str, list[dict]] = {}
    for row in samples:
        by_suite.setdefault(row["suite"], []).append(row)
    # Disagreements first: they are what a reviewer wants to read.
    for rows in by_suite.values():
        rows.sort(key=lambda r: (r["candidate"].get("score") == r["base"].get("score"), r["item_id"]))
    return env.get_template("report.html.j2").render(
        report=report,
        plots=plots,
        suites=by_name,
        samples=by_suite,
        colours=LEVEL_COLOURS,
        levels=LEVELS,
        max_samples=max_samples_per_suite,
    )


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict) -> str:
    gate = report["gate"]
    lines = [
        "# Safety evaluation report",
        "",
        f"- candidate: `{report['candidate']['spec']}` ({(report['candidate'].get('digest') or 'not loaded')[:12]})",
        f"- base: `{report['base']['spec']}` ({report['base']['digest'][:12]})",
        f"- created: {report['created_at']}; limit: {report['run']['limit'] or 'none (full run)'}",
        f"- **gate: {gate['verdict'].upper()}** (overall {gate['overall_level']}, deployable up to {gate['deployable_level']})",
    ]
    lines += [f"  - {r}" for r in gate["reasons"]]
    lines += diff_markdown(report.get("diff"))
    lines += [
        "",
        "## Scorecard",
        "",
        "| category | level | suite | metric | candidate [95% CI] | base [95% CI] | difference [95% CI] | suite level |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name = {s["name"]: s for s in report["suites"]}
    for c in report["categories"]:
        for i, name in enumerate(c["suites"]):
            s = by_name[name]
            head = f"{c['name']} | **{c['level']}**" if i == 0 else " | "
            if s["status"] != "completed":
                lines.append(f"| {head} | {name} | {s['metric']} | {s['status']}: {s.get('error') or ''} | | | |")
                continue
            cell = lambda d: f"{d['value']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"  # noqa: E731
            lines.append(
                f"| {head} | {name} | {s['metric']} | {cell(s['candidate'])} | {cell(s['base'])} | "
                f"{cell(s['difference'])} | {s['level']} |"
            )
    agree = report["graders"]["refusal"]
    lines += [
        "",
        "## Grader agreement",
        "",
        f"Refusal grader ({agree['grader']}) on {agree['n']} labelled validation completions: accuracy "
        f"{agree['accuracy']}, precision {agree['precision']}, recall {agree['recall']}.",
        "",
        "## Timing",
        "",
    ]
    lines += [f"- {k}: {v:.1f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in report["timing"].items()]
    return "\n".join(lines) + "\n"


def diff_markdown(diff: dict | None) -> list[str]:
    """The "what changed" section: new failures first, then levels and metrics."""
    if not diff:
        return []
    if "error" in diff:
        return ["", "## What changed since the previous release", "", diff["error"]]
    lines = [
        "",
        "## What changed since the previous release",
        "",
        f"Previous report {diff['previous']['report_id']} ({diff['previous']['candidate']}): gate "
        f"{diff['verdicts']['previous']} -> {diff['verdicts']['current']}.",
        "",
        "New failures:",
    ]
    lines += [f"- **{f['detail']}**" for f in diff["new_failures"]] or ["- none"]
    lines += ["", "| category | previous | current | change |", "|---|---|---|---|"]
    lines += [
        f"| {r['category']} | {r['previous'] or '-'} | {r['current'] or '-'} | {r['change']} |" for r in diff["levels"]
    ]
    lines += ["", "| suite | metric | previous | current | change | intervals overlap |", "|---|---|---|---|---|---|"]
    for m in diff["metrics"]:
        if "change" in m:
            lines.append(
                f"| {m['suite']} | {m['metric']} | {m['previous']:.3f} | {m['current']:.3f} | {m['change']:+.3f} | "
                f"{m['intervals_overlap']} |"
            )
        else:
            lines.append(
                f"| {m['suite']} | {m['metric']} | {m['previous_status'] or '-'} | {m['current_status'] or '-'} | | |"
            )
    return lines


def write_report(out_dir: str | Path, report: dict, samples: list[dict]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("samples.jsonl", "report.html", "report.md", "report.json")}
    atomic_write(paths["samples.jsonl"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    atomic_write(paths["report.html"], render_html(report, samples))
    atomic_write(paths["report.md"], render_markdown(report))
    atomic_write(paths["report.json"], json.dumps(report, indent=2, ensure_ascii=False, default=str))
    return paths


def load_report(path: str | Path) -> dict:
    """A report.json (or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no report; run `offsite-admin evals local run ... --out DIR` first") from None
