"""Safety-eval throughput: the whole default suite, candidate and base, on one model.

    python -m bench.evals --threads 1 --json /tmp/cold.json      # smollm2-135m, all suites, cold cache
    python -m bench.evals --threads 1 --cache /tmp/ec --fill-base --json bench/results/evals.json
    python -m bench.evals --model tiny-llama --limit 10 --json /tmp/e.json   # a quick look

The candidate is the base with one block's weights nudged by tiny deterministic noise
(``--candidate-seed``): a different weight digest, so the candidate shares nothing with the
base through the output cache, as with a real fine-tuned candidate.

Two costs. Cold (the default: a fresh cache): both sides do the full work, as for the first
release of a base. Warm (``--cache DIR`` holding the base's outputs, or ``--fill-base`` to
put them there first, timed apart): the gate as the server runs it for every later release,
where the base's outputs come from its eval cache (keyed by weight digest, rendered prompt
and decoding settings) and only the candidate's side is computed. Reported: wall and CPU
seconds (the machine is shared: with one thread, CPU seconds is what an idle core takes),
load, per suite and side the model seconds, tokens run and generated, cache hits/misses,
and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from offsite.emulators.models import DEFAULT_MODEL, LoadedModel, load_model
from offsite.safety_evals.runner import DEFAULT_BATCH_SIZE, run_eval

TARGET_S = 15 * 60


def nudged_copy(loaded: LoadedModel, scale: float = 1e-3, seed: int = 0) -> LoadedModel:
    """A second copy of the model with the last block's matrices slightly perturbed."""
    import copy

    model = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(seed)
    last = loaded.family.num_layers(model.config) - 1
    prefix = loaded.family.block_prefix(last)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix) and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return loaded.with_weights(model, f"{loaded.model_id}+nudged{seed}")


def measured(fn) -> tuple[dict, object]:
    """Run fn(); its wall and CPU seconds (this process) and the load average around it."""
    load0 = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    m = {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    return m, value


def side_totals(report: dict) -> dict:
    """Per side, the model work summed over the suites (Worker.stats)."""
    totals: dict[str, dict] = {}
    for s in report["suites"]:
        for role, st in (s.get("timing") or {}).get("sides", {}).items():
            t = totals.setdefault(role, {})
            for k, v in st.items():
                t[k] = round(t.get(k, 0) + v, 3)
    return totals


def run_mode(sides: dict) -> str:
    if sides.get("base", {}).get("misses", 0):
        return "cold: both sides computed"
    if sides.get("candidate", {}).get("misses", 0):
        return "warm: base outputs cached, the candidate's side computed"
    return "all cached: a re-grade, no model work"


def per_suite_table(report: dict) -> str:
    head = f"  {'suite':26s} {'n':>4s} {'cpu s':>7s} | {'side':9s} {'model s':>8s} {'prompt tok':>10s} {'gen tok':>8s} {'loss tok':>8s} {'miss':>5s}"
    lines = [head]
    for s in report["suites"]:
        t = s.get("timing") or {}
        for i, (role, st) in enumerate(t.get("sides", {}).items()):
            left = f"  {s['name']:26s} {s['n_items']:4d} {t['cpu_s']:7.1f}" if i == 0 else " " * 41
            lines.append(
                f"{left} | {role:9s} {st['model_s']:8.1f} {st['prompt_tokens']:10d} {st['generated_tokens']:8d} "
                f"{st['loss_tokens']:8d} {st['misses']:5d}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, default=None, help="items per suite (default: all)")
    ap.add_argument("--suites", nargs="*", default=None)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="report directory (default: a temporary one)")
    ap.add_argument("--cache", default=None, help="output cache directory (default: a fresh one under --out)")
    ap.add_argument(
        "--fill-base",
        action="store_true",
        help="first compute the base's outputs into --cache (timed apart), then time the gate with them cached",
    )
    ap.add_argument("--candidate-seed", type=int, default=0, help="seed of the candidate's nudge (another candidate)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    base = load_model(args.model)
    candidate = nudged_copy(base, seed=args.candidate_seed)
    load_s = time.perf_counter() - t0
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-evals-"))
    cache_dir = Path(args.cache) if args.cache else out / "cache"
    if args.fill_base and not args.cache:
        ap.error("--fill-base needs --cache DIR (the base's outputs go there)")
    run = dict(progress=sys.stderr.isatty(), policy_path=None, cache_dir=cache_dir, batch_size=args.batch_size)
    base_fill = None
    if args.fill_base:
        # The base against itself: equal digests, so each output is computed once, for the base.
        fill, _ = measured(lambda: run_eval(base, base, args.suites, args.limit, out / "base-fill", **run))
        base_fill = {k: fill[k] for k in ("wall_s", "cpu_s", "loadavg_before", "loadavg_after")}
    m, report = measured(lambda: run_eval(candidate, base, args.suites, args.limit, out, **run))
    wall, cpu, load_before = m["wall_s"], m["cpu_s"], m["loadavg_before"]
    timing = report["timing"]
    samples = timing["samples"]
    sides = side_totals(report)
    result = {
        "model": args.model,
        "mode": run_mode(sides),
        "candidate_seed": args.candidate_seed,
        "cache": str(cache_dir),
        "base_fill": base_fill,
        "sides": sides,
        "limit": args.limit,
        "suites": [s["name"] for s in report["suites"]],
        "items": {s["name"]: s["n_items"] for s in report["suites"]},
        "samples": samples,
        "batch_size": args.batch_size,
        "max_new_tokens": "per suite YAML (16; 24 instruction_hierarchy; 12 extraction)",
        "threads": args.threads,
        "load_s": round(load_s, 2),
        "wall_s": wall,
        "cpu_s": cpu,
        "uncontended_estimate_s": round(cpu / args.threads, 1),
        "samples_per_s": round(samples / wall, 3),
        "model_s": round(timing["model_s"], 1),
        "grading_s": round(timing["grading_s"], 2),
        "scoring_s": round(timing["scoring_s"], 2),
        "report_s": round(timing["report_s"], 2),
        "share_model": round(timing["model_s"] / wall, 4),
        "share_grading": round(timing["grading_s"] / wall, 4),
        "target_s": TARGET_S,
        "meets_target_wall": wall <= TARGET_S,
        "meets_target_uncontended": cpu / args.threads <= TARGET_S,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_before": load_before,
        "loadavg_after": m["loadavg_after"],
        "gate": report["gate"]["verdict"],
        "levels": {c["name"]: c["level"] for c in report["categories"]},
        "values": {
            s["name"]: {"candidate": s["candidate"]["value"], "base": s["base"]["value"]}
            for s in report["suites"]
            if s["status"] == "completed"
        },
        "report_dir": str(out),
    }
    # Per-suite CPU seconds scaled to the full item counts: the estimate of a full run when
    # --limit was given (model work is linear in items for every method).
    from offsite.safety_evals.suite import select_suites

    full_items = {s.name: len(s.items()) for s in select_suites(args.suites)}
    est_cpu = sum(
        s["timing"]["cpu_s"] * full_items[s["name"]] / max(s["n_items"], 1) for s in report["suites"] if s.get("timing")
    )
    result["full_items"] = full_items
    result["per_suite_timing"] = {s["name"]: s.get("timing") for s in report["suites"]}
    result["full_run_cpu_s_estimate"] = round(est_cpu, 1)
    result["full_run_uncontended_s_estimate"] = round(est_cpu / args.threads, 1)
    rows = [
        ("samples (item x side)", samples),
        ("wall s", result["wall_s"]),
        ("cpu s / threads", result["uncontended_estimate_s"]),
        ("samples/s", result["samples_per_s"]),
        ("model share", result["share_model"]),
        ("grading share", result["share_grading"]),
        ("peak RSS MB", result["peak_rss_mb"]),
        ("full run cpu s (est.)", result["full_run_cpu_s_estimate"]),
        ("load avg before/after", f"{load_before[0]:.1f} / {m['loadavg_after'][0]:.1f}"),
    ]
    if base_fill:
        rows.append(("base fill wall / cpu s", f"{base_fill['wall_s']} / {base_fill['cpu_s']}"))
    print(f"safety evals on {args.model} (threads={args.threads}, batch={args.batch_size}, limit={args.limit})")
    print(f"  mode: {result['mode']}")
    for k, v in rows:
        print(f"  {k:24s} {v}")
    print(per_suite_table(report))
    for name, n in result["items"].items():
        v = result["values"].get(name)
        shown = f"cand {v['candidate']:.3f}  base {v['base']:.3f}" if v else "not completed"
        print(f"  {name:26s} n={n:4d}  {shown}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
