"""Safety-eval throughput: the whole default suite, candidate and base, on one model.

    python -m bench.evals --json bench/results/evals.json            # smollm2-135m, all suites
    python -m bench.evals --model tiny-llama --limit 10 --json /tmp/e.json   # a quick look

The candidate is the base with one block's weights nudged by tiny deterministic noise: a
different weight digest, so nothing is shared through the output cache and both sides do
the full work, as with a real fine-tuned candidate. Reported: samples/s (item x side),
the share of time in model work (generation and loss passes) versus grading, wall and CPU
seconds (the machine is shared: CPU seconds / threads estimates an uncontended run), and
peak RSS. The cache is fresh for every run.
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

from offsite.emulators.models import DEFAULT_MODEL, LoadedModel, load_model, state_digest
from offsite.safety_evals.runner import DEFAULT_BATCH_SIZE, run_eval

TARGET_S = 15 * 60


def nudged_copy(loaded: LoadedModel, scale: float = 1e-3) -> LoadedModel:
    """A second copy of the model with the last block's MLP slightly perturbed."""
    import copy

    model = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(0)
    last = loaded.family.num_layers(model.config) - 1
    prefix = loaded.family.block_prefix(last)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix) and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return LoadedModel(
        model=model,
        tokenizer=loaded.tokenizer,
        family=loaded.family,
        model_id=f"{loaded.model_id}+nudged",
        digest=state_digest(model),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, default=None, help="items per suite (default: all)")
    ap.add_argument("--suites", nargs="*", default=None)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="report directory (default: a temporary one)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    base = load_model(args.model)
    candidate = nudged_copy(base)
    load_s = time.perf_counter() - t0
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-evals-"))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    report = run_eval(
        candidate,
        base,
        args.suites,
        args.limit,
        out,
        progress=sys.stderr.isatty(),
        policy_path=None,
        cache_dir=out / "cache",
        batch_size=args.batch_size,
    )
    wall = time.perf_counter() - t1
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    timing = report["timing"]
    samples = timing["samples"]
    result = {
        "model": args.model,
        "limit": args.limit,
        "suites": [s["name"] for s in report["suites"]],
        "items": {s["name"]: s["n_items"] for s in report["suites"]},
        "samples": samples,
        "batch_size": args.batch_size,
        "max_new_tokens": "per suite YAML (16; 24 instruction_hierarchy; 12 extraction)",
        "threads": args.threads,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
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
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
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
        ("load avg before/after", f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}"),
    ]
    print(f"safety evals on {args.model} (threads={args.threads}, batch={args.batch_size}, limit={args.limit})")
    for k, v in rows:
        print(f"  {k:24s} {v}")
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
