"""Detection power of the safety gate: does it block what it must, and pass what it should?

    python -m bench.gate_power --json bench/results/gate_power.json        # smollm2-135m, full gate
    python -m bench.gate_power --model tiny-llama --steps 4 --limit 4 --json /tmp/g.json   # mechanism only

Four candidates of the model, each made the way a data owner makes a release: an Offsite
bundle of the model (``emulators.build``, the default BuildConfig), the client engine
(``client.engine.train_adapter``, one recipe for all four), the adapter plugged into the
full model (``emulators.plugin`` via the runner's ``adapter:PATH``):

- harmful:    disallowed-category requests (none of them an evaluated goal) answered "Sure,
              here is how to ..." followed by harmless filler: compliance style, never content;
- memorising: a data owner's python-reference shard with the privacy audit's member records
              planted ``--canary-repeat`` times (default 10) among its text;
- damaged:    the same shard with the tokens of every 256-token block shuffled;
- benign:     the same shard as it is (a normal python-reference fine-tune).

Each candidate runs the full gate (every suite, default policy) against the base model.
Written under ``candidates.<name>``: verdict, blocked categories, whether it was blocked for
the expected category, and per suite the candidate/base values with 95% intervals and the
margin to the blocking threshold (positive: room left; negative: crossed).

Adapters, the bundle and every model output are cached in ``--work`` (base outputs are
shared by all four candidates), so a rerun only does what changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench import gate_power_candidates
from bench.gate_power_candidates import CANDIDATES, build_candidate_bundle, train_candidate
from bench.gate_power_report import merge_runs, metric_table, summarise, table, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped default model")
    ap.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--steps", type=int, default=40, help="training steps per candidate (one recipe for all)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--canary-repeat", type=int, default=10, help="copies of each audit record in the memorising shard")
    ap.add_argument(
        "--owner-topics", type=int, default=None, help="cap the data owner's shard at this many topics (quick runs)"
    )
    ap.add_argument("--suites", nargs="*", default=None, help="default: every suite (the full gate)")
    ap.add_argument(
        "--limit", type=int, default=None, help="items per suite (a limited run never passes the default policy)"
    )
    ap.add_argument("--policy", default=None)
    ap.add_argument(
        "--allow-limited",
        action="store_true",
        help="with --limit: judge by the given policy with require_full_run off (recorded in the JSON)",
    )
    ap.add_argument(
        "--require-evaluated",
        action="store_true",
        help="with --suites: require only the categories of the chosen suites (a targeted run; recorded)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rotate",
        type=int,
        default=0,
        help="start at the K-th suite (several processes sharing --work's output cache then split the base's work)",
    )
    ap.add_argument("--work", default="/tmp/offsite-gate-power", help="bundle, adapters, reports and output cache")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RUN_JSON",
        help="combine earlier runs' JSON into one result (no model work)",
    )
    args = ap.parse_args(argv)
    if args.merge:
        out = merge_runs(args.merge)
        print(out["table"])
        print()
        print(metric_table(out["candidates"]))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=2, default=str) + "\n")
        return 0 if out["all_correct"] else 1

    from offsite.emulators.models import DEFAULT_MODEL
    from offsite.safety_evals.runner import run_eval

    model = args.model or DEFAULT_MODEL
    policy = args.policy
    if args.allow_limited or args.require_evaluated:
        from offsite.safety_evals.policy import load_policy
        from offsite.safety_evals.suite import select_suites

        policy = load_policy(args.policy)
        if args.allow_limited:
            policy.require_full_run = False
            policy.source += f" (require_full_run off for --limit {args.limit})"
        if args.require_evaluated:
            policy.required_categories = sorted({s.category for s in select_suites(args.suites)})
            policy.source += f" (required categories: {', '.join(policy.required_categories)})"
    gate_power_candidates.OWNER_TOPICS = args.owner_topics  # owner_shard() reads it
    torch.set_num_threads(args.threads)
    if args.rotate:
        from offsite.safety_evals.suite import select_suites

        names = [s.name for s in select_suites(args.suites)]
        k = args.rotate % len(names)
        args.suites = names[k:] + names[:k]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_all, cpu0 = time.perf_counter(), time.process_time()
    say = lambda m: print(m, file=sys.stderr, flush=True)
    say(f"[gate_power] bundle of {model} in {work}")
    t0 = time.perf_counter()
    bundle, pub = build_candidate_bundle(model, work)
    build_s = time.perf_counter() - t0
    results: dict = {}
    training: dict = {}
    for name in args.candidates:
        say(f"[gate_power] {name}: training")
        training[name] = train_candidate(name, bundle, pub, work, args.steps, args.lr, args.canary_repeat)
        say(f"[gate_power] {name}: gate ({training[name]['loss_first']:.3f} -> {training[name]['loss_last']:.3f})")
        t0, c0 = time.perf_counter(), time.process_time()
        report = run_eval(
            f"adapter:{training[name]['adapter']}",
            model,
            args.suites,
            args.limit,
            work / "reports" / name,
            progress=sys.stderr.isatty(),
            policy_path=policy,
            cache_dir=work / "eval-cache",
        )
        results[name] = {
            **summarise(name, report),
            "eval_wall_s": round(time.perf_counter() - t0, 1),
            "eval_cpu_s": round(time.process_time() - c0, 1),
            "report": str(work / "reports" / name),
        }
        say(f"[gate_power] {name}: {results[name]['verdict']} {results[name]['blocked_categories']}")
        write_json(
            args, model, results, training, build_s, t_all, cpu0, load_before, partial=name != args.candidates[-1]
        )
    out = write_json(args, model, results, training, build_s, t_all, cpu0, load_before, partial=False)
    print(table(results))
    print()
    print(metric_table(results))
    return 0 if out["all_correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
