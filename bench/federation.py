"""Federation benchmark: quality against centralized training, server overhead, scale.

    python -m bench.federation --json bench/results/federation.json [--part quality|scale|all]

- quality (default model, SmolLM2-135M; the shipped emulator, `bench.client_train.shipped_emulator`):
  3 data owners, each with one python-reference shard (non-IID topics), run R rounds of S
  local steps through the Simulation Engine with --scheme and --upload (default: sparse fp16
  deltas of what each owner trained, `offsite.wire`); the centralized offsite baseline trains
  the same bundle's adapter on the union of the three shards for R*S steps (same batch, lr,
  scheme). Both adapters are plugged into the full model and scored on the held-out topics.
  Targets: federated plug-in ppl within 5% of centralized; upload per owner per round
  (`bytes_up_per_owner_round`) <= 1/10 of the full fp32 adapter (`full_adapter_bytes`).
  `--baseline-json` names a run of today's protocol (--scheme full --upload full) on the
  same configuration, whose plug-in ppl the sparse run must match within 1%.
- overhead: the server's own time per round (configure + aggregate + persist; plug-in
  evaluation excluded and reported apart) as a share of the round's wall time, from the
  quality run. Target: <= 5%.
- scale (tiny-llama): one simulation round with 10, 100 and 1000 virtual clients (one
  local step each, a few paragraphs of data each), wall time of the round and of the
  server's part. Target: 1000 clients per round on this machine.

Timings are wall-clock on a shared 2-core machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])


def quality(
    work: Path,
    model: str,
    rounds: int,
    local_steps: int,
    build: dict,
    config_name: str,
    heldout_limit: int,
    workers: int,
    scheme: str,
    upload: str,
    centralized: bool = True,
    bundle: str = "",
    public_key: str = "",
    eval_fraction: float = 0.1,
) -> dict:
    import torch

    from offsite.client.engine import TrainConfig, train_adapter
    from offsite.emulators.bundle import load_bundle
    from offsite.emulators.data import python_reference_split
    from offsite.server.federation.evaluate import PluginEvaluator
    from offsite.server.federation.job_runner import prepare_local_job, run_simulation_job

    torch.set_num_threads(2)
    common = dict(
        local_steps=local_steps,
        batch_size=4,
        block_size=256,
        lr=1e-4,
        min_clients=3,
        round_timeout=3600,
        heldout_limit=heldout_limit,
        scheme=scheme,
        upload=upload,
        eval_fraction=eval_fraction,
    )
    job = prepare_local_job(
        work,
        model,
        clients=3,
        rounds=rounds,
        build=build,
        progress=True,
        bundle=bundle or None,
        public_key=public_key or None,
        client_threads=int(os.environ.get("OFFSITE_CLIENT_THREADS", 2 if workers == 1 else 1)),
        **common,
    )
    evaluator = PluginEvaluator(model, job.cfg.heldout, 256, heldout_limit)
    t0 = time.perf_counter()
    fed = run_simulation_job(job, workers=workers, evaluator=evaluator)
    fed_seconds = time.perf_counter() - t0
    if fed["status"] != "completed":
        raise RuntimeError(f"federated run failed: {fed.get('error')}")

    # Centralized offsite baseline: the same bundle, the union of the same shards, R*S steps.
    bundle = load_bundle(job.cfg.bundle, job.cfg.public_key)
    central_ppl = central_seconds = None
    if centralized:
        union = [e for shard in python_reference_split(3).shards for e in shard]
        t0 = time.perf_counter()
        cfg = TrainConfig(
            steps=rounds * local_steps,
            lr=1e-4,
            batch_size=4,
            block_size=256,
            seed=0,
            scheme=scheme,
            eval_fraction=eval_fraction,
        )
        central = train_adapter(bundle, union, cfg, progress=False)
        central_seconds = time.perf_counter() - t0
        central_ppl = evaluator.plugin_perplexity({k: v.numpy() for k, v in central.adapter_state.items()})
    fed_ppl = fed["rounds"][-1]["plugin_ppl"]
    rounds_out = []
    for r in fed["rounds"]:
        compute = r["round_seconds"] - r["eval_seconds"]
        rounds_out.append(
            {
                "round": r["round"],
                "clients": len(r["clients"]),
                "plugin_ppl": r["plugin_ppl"],
                "round_seconds": r["round_seconds"],
                "eval_seconds": r["eval_seconds"],
                "server_seconds": r["server_seconds"],
                "server_share": r["server_seconds"] / compute,
                "bytes_down": r["bytes_down"],
                "bytes_up": r["bytes_up"],
                "client_eval_ppl": [c["eval_ppl_after"] for c in r["clients"]],
                "client_bytes_up": [c["bytes_up"] for c in r["clients"]],
            }
        )
    shares = [r["server_share"] for r in rounds_out]
    full_adapter_bytes = sum(v.numel() * 4 for v in bundle.adapter_state().values())
    ups = [c["bytes_up"] for r in fed["rounds"] for c in r["clients"] if c.get("bytes_up")]
    up_per_owner = sum(ups) / len(ups) if ups else None
    return {
        "emulator_config": config_name,
        "bytes_up_per_owner_round": up_per_owner,
        "full_adapter_bytes": full_adapter_bytes,
        "upload_vs_full_adapter": up_per_owner / full_adapter_bytes if up_per_owner else None,
        "quality": {
            "model": model,
            "emulator_config": config_name,
            "build": build,
            "scheme": scheme,
            "upload": job.cfg.upload_format,
            "clients": 3,
            "rounds": rounds,
            "local_steps": local_steps,
            "upload_rel_error_max": max(
                (c.get("upload_rel_error") or 0.0 for r in fed["rounds"] for c in r["clients"]), default=None
            ),
            "centralized_steps": rounds * local_steps,
            "heldout_blocks": len(evaluator.blocks),
            "zero_shot_ppl": fed["plugin_ppl_initial"],
            "federated_plugin_ppl": fed_ppl,
            "centralized_plugin_ppl": central_ppl,
            "federated_vs_centralized": fed_ppl / central_ppl if central_ppl else None,
            "target_ratio_max": 1.05,
            "meets_target": fed_ppl <= 1.05 * central_ppl if central_ppl else None,
            "federated_seconds": fed_seconds,
            "centralized_seconds": central_seconds,
            "rounds_detail": rounds_out,
        },
        "overhead": {
            "server_share_per_round": shares,
            "server_share_max": max(shares),
            "target_max": 0.05,
            "meets_target": max(shares) <= 0.05,
            "what": "configure + aggregate + persist, over round wall time without the plug-in evaluation",
        },
    }


def _paragraph_corpus(path: Path, chunk_chars: int = 400) -> Path:
    """python-reference cut into ~400-character pieces: thousands of small examples for many clients."""
    from pydoc_data.topics import topics

    path.mkdir(parents=True, exist_ok=True)
    with open(path / "paragraphs.jsonl", "w") as fh:
        for name in sorted(topics):
            text = topics[name]
            for i in range(0, len(text) - chunk_chars // 2, chunk_chars):
                fh.write(json.dumps({"text": text[i : i + chunk_chars]}) + "\n")
    return path


def scale(work: Path, sizes: list[int], workers: int) -> dict:
    from offsite.server.federation.job_runner import prepare_local_job, run_simulation_job

    corpus = _paragraph_corpus(work / "corpus")
    rows = []
    for n in sizes:
        job = prepare_local_job(
            work / f"scale-{n}",
            "tiny-llama",
            clients=n,
            rounds=1,
            corpus=str(corpus),
            local_steps=1,
            batch_size=1,
            block_size=64,
            eval_fraction=0.0,
            min_clients=max(1, int(0.9 * n)),
            round_timeout=3600,
            heldout_limit=4,
        )
        t0 = time.perf_counter()
        res = run_simulation_job(job, workers=workers)
        wall = time.perf_counter() - t0
        r = res["rounds"][0] if res.get("rounds") else {}
        rows.append(
            {
                "clients": n,
                "completed": res["status"] == "completed",
                "replies": len(r.get("clients", [])),
                "round_seconds": r.get("round_seconds"),
                "server_seconds": r.get("server_seconds"),
                "server_share": (r["server_seconds"] / (r["round_seconds"] - r["eval_seconds"])) if r else None,
                "bytes_down": r.get("bytes_down"),
                "bytes_up": r.get("bytes_up"),
                "simulation_wall_seconds": wall,
            }
        )
        shutil.rmtree(work / f"scale-{n}" / "work", ignore_errors=True)
    ok = any(row["clients"] >= 1000 and row["completed"] for row in rows)
    return {
        "scale": {"model": "tiny-llama", "workers": workers, "rows": rows, "target_clients": 1000, "meets_target": ok}
    }


def shipped_build() -> tuple[str, dict]:
    """(name, build options) of the emulator we ship, for `prepare_local_job(model, build=...)`."""
    from bench.client_train import shipped_emulator

    name, shipped = shipped_emulator()
    # every field but the model (passed on its own): a hand-picked list once dropped
    # prune_fraction and built an emulator we do not ship
    return name, {k: v for k, v in vars(shipped).items() if k != "model"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--part", choices=["quality", "scale", "all"], default="all")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--quantize", default=None, help="middle blocks of the bundle (default: the shipped emulator)")
    ap.add_argument("--scheme", default="norms,channels:0.25", help="what each data owner trains (engine scheme)")
    ap.add_argument("--upload", default="auto", help="auto | full | sparse-fp16 | sparse-int8 (see offsite.wire)")
    ap.add_argument(
        "--baseline-json", default="", help="a run of --scheme full --upload full on the same configuration"
    )
    ap.add_argument(
        "--no-centralized", action="store_true", help="skip the centralized baseline (e.g. for the baseline run)"
    )
    ap.add_argument("--bundle", default="", help="reuse this bundle of the same configuration (with --public-key)")
    ap.add_argument("--public-key", default="")
    ap.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of each owner's data it scores itself on (0: none)"
    )
    ap.add_argument("--heldout-limit", type=int, default=0, help="held-out blocks for plug-in ppl (0: all)")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--workers", type=int, default=1, help="Ray workers (clients trained in parallel)")
    ap.add_argument("--work-dir", default="", help="keep state here (default: a temp dir, removed)")
    args = ap.parse_args()

    load_start = os.getloadavg()
    out_path = Path(args.json)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-federation-"))
    try:
        if args.part in ("quality", "all"):
            if args.quantize:
                name, build = args.quantize, {"quantize": args.quantize}
            else:
                name, build = shipped_build()
            results.update(
                quality(
                    work / "quality",
                    args.model,
                    args.rounds,
                    args.local_steps,
                    build,
                    name,
                    args.heldout_limit,
                    args.workers,
                    args.scheme,
                    args.upload,
                    not args.no_centralized,
                    args.bundle,
                    args.public_key,
                    args.eval_fraction,
                )
            )
            if args.baseline_json:
                base = json.loads(Path(args.baseline_json).read_text())
                q = results["quality"]
                q["baseline"] = {
                    "json": args.baseline_json,
                    "scheme": base["quality"]["scheme"],
                    "upload": base["quality"]["upload"],
                    "federated_plugin_ppl": base["quality"]["federated_plugin_ppl"],
                    "bytes_up_per_owner_round": base["bytes_up_per_owner_round"],
                }
                q["plugin_vs_baseline"] = q["federated_plugin_ppl"] / base["quality"]["federated_plugin_ppl"]
                q["upload_vs_baseline"] = results["bytes_up_per_owner_round"] / base["bytes_up_per_owner_round"]
        if args.part in ("scale", "all"):
            results.update(scale(work / "scale", [int(x) for x in args.sizes.split(",")], max(args.workers, 2)))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_start": load_start,
        "load_avg": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    if "quality" in results:
        q, o = results["quality"], results["overhead"]
        print(
            _table(
                [
                    ["zero-shot", f"{q['zero_shot_ppl']:.3f}", ""],
                    [
                        "centralized offsite",
                        f"{q['centralized_plugin_ppl'] or float('nan'):.3f}",
                        f"{q['centralized_seconds'] or 0:.0f}",
                    ],
                    ["federated (3 owners)", f"{q['federated_plugin_ppl']:.3f}", f"{q['federated_seconds']:.0f}"],
                ],
                ["plug-in (held-out)", "ppl", "seconds"],
            )
        )
        print(
            f"federated / centralized = {q['federated_vs_centralized'] or float('nan'):.4f} (target <= 1.05: {q['meets_target']})"
        )
        print(
            f"upload per owner per round: {results['bytes_up_per_owner_round'] / 1e6:.2f} MB = "
            f"{results['upload_vs_full_adapter']:.3f} of the full fp32 adapter ({results['full_adapter_bytes'] / 1e6:.1f} MB)"
        )
        if "plugin_vs_baseline" in q:
            print(f"plug-in ppl vs the full-upload baseline: {q['plugin_vs_baseline']:.4f} (target within 1%)")
        print(f"server overhead per round: max {100 * o['server_share_max']:.2f}% (target <= 5%: {o['meets_target']})")
    if "scale" in results:
        s = results["scale"]
        print(
            _table(
                [
                    [
                        r["clients"],
                        r["replies"],
                        f"{r['round_seconds']:.1f}" if r["round_seconds"] else "-",
                        f"{r['server_seconds']:.2f}" if r["server_seconds"] else "-",
                        f"{100 * r['server_share']:.2f}%" if r["server_share"] else "-",
                    ]
                    for r in s["rows"]
                ],
                ["clients", "replies", "round s", "server s", "server share"],
            )
        )


if __name__ == "__main__":
    main()
