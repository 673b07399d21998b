"""`offsite-admin evals local ...`: run safety suites on this machine, grade completions, gate,
override.

The server-side commands (`offsite-admin evals run|reports|schedule ...`) run the same runner
as an operation on the server and keep the reports as artifacts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offsite.cli import JsonOption, console, fail, json_option
from offsite.files import JsonlError, read_jsonl

app = typer.Typer(
    no_args_is_help=True,
    help="Safety evals: run suites on a candidate vs its base, grade completions, gate releases.\n\n"
    "Example: offsite-admin evals local run --candidate adapter:out/adapter.safetensors --base smollm2-135m --limit 20 --out eval-out",
)


@app.command("run")
def run(
    candidate: str = typer.Option(
        ...,
        "--candidate",
        help="model name, HF model directory, adapter:PATH (plugged into --base), or a release id rel_... (with --data-dir)",
    ),
    base: Optional[str] = typer.Option(
        None,
        "--base",
        help="the base model the candidate is compared with (default: the release's base, else smollm2-135m)",
    ),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="a server data directory, to evaluate a release by id offline"
    ),
    suites: Optional[list[str]] = typer.Option(
        None, "--suites", "--suite", help="suite or category names, or YAML paths (repeatable; default: all)"
    ),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="items per suite, for a quick look (the default policy then blocks)"
    ),
    out: Path = typer.Option(..., "--out", help="report directory (report.json/html/md, samples.jsonl, cache/)"),
    policy: Optional[Path] = typer.Option(
        None, "--policy", help="gate policy YAML (default: the shipped default policy)"
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="output cache (default: OUT/cache); reruns resume from it"
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="generation / loss batch size"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads"),
    fail_on_block: bool = typer.Option(False, "--fail-on-block", help="exit with status 3 when the gate blocks"),
    json_out: bool = json_option("print the report summary as JSON"),
) -> None:
    """Run the suites on CANDIDATE and BASE side by side and write the report.

    Example: offsite-admin evals local run --candidate tiny-llama --base tiny-llama --limit 5 --out /tmp/ev --json
    """
    import torch

    from offsite.emulators.models import ModelNotFoundError
    from offsite.safety_evals.policy import PolicyError
    from offsite.safety_evals.runner import EvalError, run_eval
    from offsite.safety_evals.suite import SuiteError

    if threads:
        torch.set_num_threads(threads)
    try:
        if candidate.startswith("rel_"):
            candidate, release_base = _release_candidate(candidate, data_dir)
            base = base or release_base
        report = run_eval(
            candidate,
            base or "smollm2-135m",
            suites or None,
            limit,
            out,
            progress=not json_out and sys.stderr.isatty(),
            policy_path=policy,
            cache_dir=cache_dir,
            batch_size=batch_size,
        )
    except (ModelNotFoundError, PolicyError, SuiteError, EvalError, FileNotFoundError, ValueError, LookupError) as e:
        fail(str(e))
    except KeyboardInterrupt as e:
        fail(str(e) or "interrupted", code=130)
    summary = _summary(report, out)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        _print_summary(report, out)
    if fail_on_block and report["gate"]["verdict"] != "pass":
        raise typer.Exit(3)


def _release_candidate(release_id: str, data_dir: Path | None) -> tuple[str, str]:
    """(adapter:PATH, base model source) of a release in a server's registry and artifact store."""
    if data_dir is None:
        raise ValueError(
            f"{release_id} is a release id: pass --data-dir SERVER_DATA_DIR (or run "
            f"`offsite-admin evals run --candidate {release_id}` against the server)"
        )
    from offsite.server.artifacts import ArtifactStore
    from offsite.server.registry import Registry
    from offsite.server.state import BUILTIN_MODELS

    db = data_dir / "registry.db"
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no registry; --data-dir must be the directory `offsite-admin serve` uses")
    reg = Registry(f"sqlite:///{db}")
    try:
        release = reg.get_release(release_id)
        model = reg.get_model(release.model_id)
    finally:
        reg.close()
    if not release.adapter_sha256:
        raise ValueError(f"release {release_id} has no adapter artifact")
    adapter = ArtifactStore(data_dir / "artifacts").path(release.adapter_sha256)
    source = model.source if model.source in BUILTIN_MODELS else str(data_dir / "models" / model.source)
    return f"adapter:{adapter}", source


def _summary(report: dict, out: Path) -> dict:
    return {
        "report_id": report["report_id"],
        "candidate": report["candidate"]["spec"],
        "base": report["base"]["spec"],
        "gate": report["gate"],
        "categories": [
            {"name": c["name"], "level": c["level"], "complete": c["complete"]} for c in report["categories"]
        ],
        "suites": [
            {k: s.get(k) for k in ("name", "category", "status", "metric", "level", "n_items", "error")}
            | ({"candidate": s["candidate"]["value"], "base": s["base"]["value"]} if s["status"] == "completed" else {})
            for s in report["suites"]
        ],
        "graders": report["graders"],
        "files": {n: str(out / n) for n in ("report.json", "report.html", "report.md", "samples.jsonl")},
    }


def _print_summary(report: dict, out: Path) -> None:
    table = Table(title=f"{report['candidate']['spec']} vs {report['base']['spec']}")
    for col in ("category", "suite", "metric", "candidate", "base", "level"):
        table.add_column(col)
    for s in report["suites"]:
        if s["status"] == "completed":
            table.add_row(
                s["category"],
                s["name"],
                s["metric"],
                f"{s['candidate']['value']:.3f}",
                f"{s['base']['value']:.3f}",
                s["level"],
            )
        else:
            table.add_row(s["category"], s["name"], s["metric"], s["status"], "", "")
    console.print(table)
    gate = report["gate"]
    colour = "green" if gate["verdict"] == "pass" else "red"
    console.print(
        f"gate: [bold {colour}]{gate['verdict']}[/] (overall {gate['overall_level']}); report: {out / 'report.html'}"
    )
    for r in gate["reasons"]:
        console.print(f"  - {r}")


@app.command("grade")
def grade(
    input_path: str = typer.Argument(
        ..., metavar="INPUT.jsonl", help="lines with `prompt` and `completion` ('-' = stdin)"
    ),
    grader: str = typer.Option(
        "refusal", "--grader", help="refusal (did it refuse?) or affirmative_compliance (did it agree to do it?)"
    ),
    mode: str = typer.Option(
        "combined", "--mode", help="refusal grader: combined (rules OR classifier), rules, or classifier"
    ),
    json_out: bool = json_option("one JSON line per input with `refused` (or `complied`)"),
) -> None:
    """Grade completions offline; one result per input line, in order.

    Example: offsite-admin evals local grade --grader refusal completions.jsonl --json
             offsite-admin evals local grade --grader affirmative_compliance jailbreak.jsonl
    """
    from offsite.safety_evals.compliance import ComplianceGrader
    from offsite.safety_evals.graders import GraderError, RefusalGrader

    if grader not in ("refusal", "affirmative_compliance"):
        fail(
            f"grader {grader!r} is not available from the command line; use --grader refusal or affirmative_compliance"
        )
    try:
        refusal = RefusalGrader(mode=mode)
        # the compliance grader's "does not decline" check reads refusals with this grader
        g = ComplianceGrader(refusal) if grader == "affirmative_compliance" else refusal
    except GraderError as e:
        fail(str(e))
    verdict = "refused" if grader == "refusal" else "complied"
    fh = sys.stdin if input_path == "-" else None
    if fh is None:
        try:
            fh = open(input_path, "rb")  # read_jsonl decodes, naming the line of bad UTF-8
        except OSError as e:
            fail(f"{input_path}: cannot read ({e.strerror}); pass a JSONL file with prompt and completion per line")
    results = []
    with fh:
        try:
            for where, row in read_jsonl(fh, str(input_path)):
                if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
                    fail(f"{where}: needs a string `completion` (and usually `prompt`)")
                result = g.grade(str(row.get("prompt", "")), row["completion"])
                out = {k: row[k] for k in ("id",) if k in row} | result
                results.append(out)
                if json_out:
                    typer.echo(json.dumps(out))
        except JsonlError as e:
            fail(str(e))
    if not json_out:
        yes = sum(r[verdict] for r in results)
        typer.echo(f"{len(results)} completions graded: {yes} {verdict}, {len(results) - yes} not {verdict}")


@app.command("gate")
def gate(
    report_dir: Path = typer.Argument(..., help="a report directory (or report.json)"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="decide under this policy instead of the default"),
    json_out: bool = JsonOption,
) -> None:
    """Re-decide the gate of an existing report (e.g. under another policy) without rerunning.

    Example: offsite-admin evals local gate eval-out --policy strict.yaml --json
    """
    from offsite.safety_evals.gate import decide
    from offsite.safety_evals.policy import PolicyError, as_policy
    from offsite.safety_evals.report import load_report
    from offsite.safety_evals.scorecard import build_categories, level_suite

    try:
        report = load_report(report_dir)
        pol = as_policy(policy)
    except (FileNotFoundError, PolicyError, json.JSONDecodeError) as e:
        fail(str(e))
    # Levels depend on the policy: recompute them from the stored values.
    report["suites"] = [level_suite(s, pol) if s.get("status") == "completed" else s for s in report["suites"]]
    report["categories"] = build_categories(report["suites"])
    decision = decide(report, pol)
    if json_out:
        typer.echo(json.dumps(decision))
    else:
        typer.echo(f"gate: {decision['verdict']} (overall {decision['overall_level']})")
        for r in decision["reasons"]:
            typer.echo(f"  - {r}")
    raise typer.Exit(0 if decision["verdict"] == "pass" else 3)


@app.command("override")
def override_cmd(
    report_dir: Path = typer.Argument(..., help="the report directory whose block an admin accepts"),
    reason: str = typer.Option(..., "--reason", help="why the block is accepted (at least 10 characters; audited)"),
    actor: str = typer.Option(..., "--actor", help="the admin taking the decision"),
    json_out: bool = JsonOption,
) -> None:
    """Admit a blocked report by an admin's decision; appends to REPORT_DIR/audit.jsonl first.

    Example: offsite-admin evals local override eval-out --actor alice --reason "capability drop accepted for the pilot"
    """
    from offsite.safety_evals.gate import GateError, jsonl_audit, override
    from offsite.files import atomic_write
    from offsite.safety_evals.report import load_report

    try:
        report = load_report(report_dir)
        new_gate = override(report, actor=actor, reason=reason, audit=jsonl_audit(Path(report_dir) / "audit.jsonl"))
    except (FileNotFoundError, GateError) as e:
        fail(str(e))
    report["gate"] = new_gate
    atomic_write(Path(report_dir) / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    typer.echo(
        json.dumps(new_gate)
        if json_out
        else f"gate overridden to pass by {actor}; audited in {Path(report_dir) / 'audit.jsonl'}"
    )


@app.command("suites")
def list_suites(json_out: bool = JsonOption) -> None:
    """List the available suites with their item counts.

    Example: offsite-admin evals local suites --json
    """
    from offsite.safety_evals.suite import available_suites

    rows = [
        {
            "name": s.name,
            "category": s.category,
            "method": s.method,
            "metric": s.metric,
            "items": len(s.items()),
            "file": str(s.source),
        }
        for s in available_suites().values()
    ]
    if json_out:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        typer.echo(f"{r['name']:26s} {r['category']:22s} {r['method']:20s} {r['metric']:16s} {r['items']:4d}")


@app.command("canaries")
def canaries(
    out: Path = typer.Option(..., "--out", help="JSONL to add to ONE data owner's training data for an audit run"),
) -> None:
    """Write the privacy audit's planted records (members only) as training JSONL (`text`).

    Example: offsite-admin evals local canaries --out audit-canaries.jsonl
    """
    from offsite.safety_evals.privacy import write_audit_records

    n = write_audit_records(out)
    typer.echo(f"wrote {n} audit records to {out}; plant them in one client's data, then run the privacy suites")
