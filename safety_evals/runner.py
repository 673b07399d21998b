"""Run suites on a candidate and its base, side by side on the same items.

``run_eval(candidate, base, suites, limit, out_dir)`` loads both models, runs every suite
for both (batched greedy generation or batched loss computation), grades, scores with
paired bootstrap intervals, applies the policy and the gate, and writes report.json,
report.html, report.md and samples.jsonl into ``out_dir``.

Model outputs go to an on-disk cache (``out_dir/cache`` unless ``cache_dir`` is given)
after every batch, so an interrupted run resumes where it stopped and re-grading (new
grader, new policy) generates nothing. A failed or interrupted suite is reported as such
and the gate fails closed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from offsite.emulators.models import LoadedModel, load_model

from .cache import OutputCache
from .gate import decide
from .choice import multiple_choice_suite
from .errors import EvalError
from .privacy_methods import auc_of_losses, exposure_suite, extraction_suite, membership_suite
from .prompts import render_prompt
from .graders import AnswerGrader, ForbiddenStringGrader, RefusalGrader, grader_agreement, load_validation
from .compliance import ComplianceGrader
from .policy import as_policy
from .scorecard import breakdown, build_categories, level_suite, score_suite
from .suite import Suite, select_suites
from .worker import Worker

log = logging.getLogger(__name__)

REPORT_FORMAT = "offsite-safety-report/1"
DEFAULT_BATCH_SIZE = 16
ADAPTER_PREFIX = "adapter:"


# --- models ------------------------------------------------------------------------------


@dataclass
class Side:
    """One model under evaluation: "candidate" or "base"."""

    role: str
    spec: str
    loaded: LoadedModel

    @property
    def digest(self) -> str:
        return self.loaded.digest

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "model_id": self.loaded.model_id,
            "digest": self.loaded.digest,
            "family": getattr(self.loaded.family, "name", str(self.loaded.family)),
        }


def load_with_adapter(base_spec: str, adapter_path: str) -> LoadedModel:
    """The base model with an Offsite adapter plugged in (by original parameter names)."""
    from offsite.emulators.adapter import load_adapter
    from offsite.emulators.plugin import plug_in

    loaded = load_model(base_spec)
    state, meta = load_adapter(adapter_path)
    model = plug_in(loaded, state, meta)
    model.eval()
    return loaded.with_weights(model, f"{base_spec}+{Path(adapter_path).name}")


def resolve_model(
    spec: "str | LoadedModel", base_spec: str | None = None, resolver: Callable[[str], LoadedModel] | None = None
) -> tuple[str, LoadedModel]:
    """A model spec -> (printable spec, LoadedModel).

    Specs: a LoadedModel; a built-in name or HF model directory (``load_model``);
    ``adapter:PATH`` (PATH plugged into the base model); anything else goes to `resolver`
    (the server resolves release ids this way)."""
    if isinstance(spec, LoadedModel):
        return spec.model_id, spec
    if spec.startswith(ADAPTER_PREFIX):
        if not base_spec:
            raise EvalError(f"{spec}: an adapter candidate needs --base to plug into")
        return spec, load_with_adapter(base_spec, spec[len(ADAPTER_PREFIX) :])
    if resolver is not None and not Path(spec).exists():
        with contextlib.suppress(LookupError):
            return spec, resolver(spec)
    return spec, load_model(spec)


# --- suite methods -----------------------------------------------------------------------


def _generate_suite(suite: Suite, items: list[dict], workers: dict[str, Worker], timing: dict) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    refusal = RefusalGrader() if suite.grader == "refusal" else None
    forbidden = ForbiddenStringGrader() if suite.grader == "forbidden_strings" else None
    answer = AnswerGrader() if suite.grader == "answer_match" else None
    compliance = ComplianceGrader() if suite.grader == "affirmative_compliance" else None
    for role, w in workers.items():
        prompts = [render_prompt(w.tok, suite, it) for it in items]
        completions = w.generate(prompts, suite.max_new_tokens)
        t0 = time.perf_counter()
        rows = []
        for it, comp in zip(items, completions):
            if refusal is not None:
                g = refusal.grade(it["prompt"], comp)
                score = float(g["refused"]) if suite.metric == "not_unsafe" else float(not g["refused"])
            elif forbidden is not None:
                g = forbidden.grade(it["prompt"], comp, it.get("forbidden", []))
                score = float(g["holds"])
            elif compliance is not None:
                g = compliance.grade(it["prompt"], comp)
                score = float(g["complied"])
            elif answer is not None:
                g = answer.grade(it["prompt"], comp, it.get("answers", []))
                score = (
                    float(g["outcome"] != "hallucinated")
                    if suite.metric == "not_hallucinated"
                    else float(g["outcome"] == "correct")
                )
            else:
                raise EvalError(
                    f"suite {suite.name}: method generate needs grader refusal, forbidden_strings, answer_match "
                    "or affirmative_compliance, "
                    f"not {suite.grader!r}"
                )
            rows.append({"completion": comp, "grade": g, "score": score})
        timing["grading_s"] += time.perf_counter() - t0
        results[role] = rows
    return results


def _perplexity_suite(
    suite: Suite, items: list[dict], workers: dict[str, Worker], timing: dict
) -> dict[str, list[dict]]:
    max_tokens = int(suite.params.get("max_tokens", 256))
    results = {}
    for role, w in workers.items():
        vals = w.losses([("", it["text"]) for it in items], max_tokens=max_tokens)
        results[role] = [{"completion": "", "grade": v, "nll": v["nll"], "tokens": v["tokens"]} for v in vals]
    return results


METHOD_FUNCS = {
    "generate": _generate_suite,
    "multiple_choice": multiple_choice_suite,
    "extraction": extraction_suite,
    "canary_exposure": exposure_suite,
    "membership_inference": membership_suite,
    "perplexity": _perplexity_suite,
}


def _work_units(suite: Suite, items: list[dict]) -> int:
    if suite.method == "canary_exposure":
        return len(items) * (1 + int(suite.params.get("candidates", 31)))
    if suite.method == "multiple_choice":
        return sum(len(it.get("choices") or suite.params.get("choices") or []) for it in items)
    return len(items)


# --- the run -----------------------------------------------------------------------------


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # stderr: stdout belongs to the command's result (`--json` output must stay parseable)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        console=Console(stderr=True),
    )


def run_eval(
    candidate: "str | LoadedModel",
    base: "str | LoadedModel",
    suites: list[str] | None = None,
    limit: int | None = None,
    out_dir: str | Path = "eval-out",
    progress: bool = True,
    policy_path: "str | Path | dict | None" = None,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    resolver: Callable[[str], LoadedModel] | None = None,
    write: bool = True,
    previous_report: dict | None = None,
) -> dict:
    """Evaluate `candidate` against `base`; returns the report (and writes it to `out_dir`).

    candidate/base: a model name, HF directory, ``adapter:PATH`` (candidate only: plugged
    into the base), or a LoadedModel. suites: names, categories or YAML paths (None =
    all). limit: items per suite. policy_path: a policy YAML, dict or None (default).
    previous_report: the previous release's report.json (a dict): the new report carries a
    diff against it (``report["diff"]``, shown first in the HTML and Markdown).

    A candidate that cannot be loaded does not raise: the report says why, every suite is
    failed and the gate blocks (fail closed). A bad base model still raises EvalError.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = as_policy(policy_path)
    chosen = select_suites(suites)
    cache = OutputCache(cache_dir or out / "cache")
    base_spec = base if isinstance(base, str) else None
    base_name, base_loaded = resolve_model(base, resolver=resolver)
    if isinstance(candidate, str) and candidate == base_spec:
        cand_name, cand_loaded = candidate, base_loaded  # same model: one copy in memory, shared cache entries
    else:
        try:
            cand_name, cand_loaded = resolve_model(candidate, base_spec=base_spec, resolver=resolver)
        except Exception as e:  # noqa: BLE001 - any unloadable candidate is a blocked release, never a pass
            log.error("candidate %s could not be loaded: %s", candidate, e)
            return _unloadable_report(
                candidate, base_name, base_loaded, chosen, limit, policy, out, e, write, previous_report
            )
    sides = {"candidate": Side("candidate", cand_name, cand_loaded), "base": Side("base", base_name, base_loaded)}
    timing = {"model_s": 0.0, "grading_s": 0.0, "scoring_s": 0.0, "report_s": 0.0, "total_s": 0.0}

    suite_results: list[dict] = []
    samples: list[dict] = []
    interrupted = False
    with _progress(progress) as bar:
        tasks = {}
        plans = []
        for s in chosen:
            try:
                items = s.items(limit)
            except Exception as e:  # a broken dataset fails this suite, not the whole run
                plans.append((s, None, f"{type(e).__name__}: {e}"))
                continue
            plans.append((s, items, None))
            if bar is not None:
                tasks[s.name] = bar.add_task(f"{s.name:26s}", total=2 * _work_units(s, items))
        for s, items, error in plans:
            record = {
                "name": s.name,
                "category": s.category,
                "method": s.method,
                "metric": s.metric,
                "description": s.description,
                "n_items": len(items or []),
                "status": "failed",
                "error": error,
            }
            suite_results.append(record)
            if error is not None:
                continue

            def tick(n: int, _name=s.name) -> None:
                if bar is not None and n:
                    bar.advance(tasks[_name], n)

            workers = {role: Worker(side, cache, batch_size, timing, tick) for role, side in sides.items()}
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                per_side = METHOD_FUNCS[s.method](s, items, workers, timing)
                record["timing"] = {
                    "wall_s": round(time.perf_counter() - w0, 3),
                    "cpu_s": round(time.process_time() - c0, 3),
                    "sides": {role: _rounded(w.stats) for role, w in workers.items()},
                }
                t0 = time.perf_counter()
                scored = score_suite(s.metric, per_side["candidate"], per_side["base"], policy.bootstrap_resamples)
                record.update(level_suite(scored, policy))
                extra = {role: breakdown(per_side[role]) for role in per_side}
                if extra["candidate"]:
                    record["breakdown"] = extra
                if s.method == "membership_inference":
                    record["loss_attack_auc"] = {role: auc_of_losses(per_side[role]) for role in per_side}
                record["status"] = "completed"
                timing["scoring_s"] += time.perf_counter() - t0
            except KeyboardInterrupt:
                record.update(status="interrupted", error="interrupted by the user; rerun to resume from the cache")
                interrupted = True
                break
            except Exception as e:  # noqa: BLE001 - one failing suite must not hide the others; the gate fails closed
                log.error("suite %s failed:\n%s", s.name, traceback.format_exc())
                record["error"] = f"{type(e).__name__}: {e}"
                continue
            for i, it in enumerate(items):
                samples.append(
                    {
                        "suite": s.name,
                        "category": s.category,
                        "item_id": it["id"],
                        "subcategory": it.get("subcategory", it.get("kind", "")),
                        "prompt": it.get("prompt") or it.get("prefix") or it.get("text", "")[:200],
                        "system": it.get("system", ""),
                        "candidate": _sample_side(per_side["candidate"][i]),
                        "base": _sample_side(per_side["base"][i]),
                    }
                )

    t0 = time.perf_counter()
    try:
        refusal_agreement = grader_agreement(RefusalGrader())
        real = [r for r in load_validation() if str(r.get("source", "")).startswith("smollm2")]
        if real:  # hand-labelled outputs of the default model: the style of text the grader really sees
            refusal_agreement["real_completions"] = grader_agreement(RefusalGrader(), real)
    except Exception as e:  # noqa: BLE001 - a broken grader is reported; the suites that use it already failed
        refusal_agreement = {
            "grader": "refusal",
            "n": 0,
            "accuracy": None,
            "precision": None,
            "recall": None,
            "error": f"{type(e).__name__}: {e}",
        }
    timing["grading_s"] += time.perf_counter() - t0
    report = {
        "format": REPORT_FORMAT,
        "report_id": uuid.uuid4().hex[:16],
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "candidate": sides["candidate"].describe(),
        "base": sides["base"].describe(),
        "run": {
            "suites_requested": [s.name for s in chosen],
            "limit": limit,
            "complete": not interrupted and all(r["status"] == "completed" for r in suite_results),
            "incomplete_suites": [r["name"] for r in suite_results if r["status"] != "completed"],
            "batch_size": batch_size,
            "cache": str(cache.path),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "torch_threads": torch.get_num_threads(),
        },
        "suites": suite_results,
        "categories": build_categories(suite_results),
        "graders": {"refusal": refusal_agreement},
        "policy": policy.to_dict(),
        "timing": timing,
    }
    report["gate"] = decide(report, policy)
    report["overall_level"] = report["gate"]["overall_level"]
    _attach_diff(report, previous_report)
    timing["total_s"] = time.perf_counter() - t_start
    n_model_samples = sum(r["n_items"] for r in suite_results if r["status"] == "completed") * 2
    timing["samples"] = n_model_samples
    if write:
        from .report import write_report

        t0 = time.perf_counter()
        write_report(out, report, samples)
        timing["report_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    if interrupted:
        raise KeyboardInterrupt(f"evaluation interrupted; a partial report (gate: block) is in {out}")
    return report


def _attach_diff(report: dict, previous: dict | None) -> None:
    if previous is None:
        return
    from .report_diff import diff_reports

    try:
        report["diff"] = diff_reports(previous, report)
    except Exception as e:  # noqa: BLE001 - an unreadable previous report must not stop this one
        report["diff"] = {"error": f"the previous report could not be compared: {type(e).__name__}: {e}"}


def _unloadable_report(
    candidate,
    base_name: str,
    base_loaded: LoadedModel,
    chosen: list[Suite],
    limit,
    policy,
    out: Path,
    error: Exception,
    write: bool,
    previous: dict | None,
) -> dict:
    """The report of a candidate that could not be loaded: every suite failed, gate blocks."""
    why = f"the candidate {candidate!s} could not be loaded: {type(error).__name__}: {error}"
    suites = [
        {
            "name": s.name,
            "category": s.category,
            "method": s.method,
            "metric": s.metric,
            "description": s.description,
            "n_items": 0,
            "status": "failed",
            "error": why,
        }
        for s in chosen
    ]
    report = {
        "format": REPORT_FORMAT,
        "report_id": uuid.uuid4().hex[:16],
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "candidate": {"spec": str(candidate), "model_id": None, "digest": "", "family": None, "error": why},
        "base": Side("base", base_name, base_loaded).describe(),
        "run": {
            "suites_requested": [s.name for s in chosen],
            "limit": limit,
            "complete": False,
            "incomplete_suites": [s.name for s in chosen],
            "error": why,
        },
        "suites": suites,
        "categories": build_categories(suites),
        "graders": {"refusal": {"grader": "refusal", "n": 0, "accuracy": None, "precision": None, "recall": None}},
        "policy": policy.to_dict(),
        "timing": {"total_s": 0.0, "samples": 0},
    }
    report["gate"] = decide(report, policy)
    report["gate"]["reasons"].insert(0, why)
    report["overall_level"] = report["gate"]["overall_level"]
    _attach_diff(report, previous)
    if write:
        from .report import write_report

        write_report(out, report, [])
    return report


def _rounded(stats: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}


def _sample_side(row: dict) -> dict:
    keep = {k: row[k] for k in ("completion", "grade", "score", "nll", "tokens", "member") if k in row}
    return keep
