"""Merging adapters of two jobs on disjoint corpora: does each job's gain survive the merge?

    OMP_NUM_THREADS=1 python -m bench.merging --json bench/results/merging.json

Two parents are trained with the project's own path: one signed offsite bundle of the
default model (SmolLM2-135M-Instruct, int3 + AWQ middle, as `offsite-admin demo`), the
client engine training its adapter on the emulator, plug-in by name into the full model.

- parent A: python-reference topics (pydoc_data.topics; every 5th topic is the test set,
  every 5th of the rest the validation set).
- parent B: the standard library's own documentation: the docstrings of every public module,
  class, function and method of the stdlib's top-level modules, read with `ast` (nothing is
  imported); split by module the same way (every 5th module test, every 5th of the rest
  validation).
- joint: the same engine on the union of both training sets for the parents' steps together.

Every merge method (emulators/merge.py) merges A and B as deltas from the base model's own
adapter blocks; each result is plugged in and scored on both test sets. A parent's *share
kept* = (ln ppl_zero_shot - ln ppl_merge) / (ln ppl_zero_shot - ln ppl_parent) on that
parent's own test set. Each method runs first with the library's defaults (TIES k = 20% and
lambda 1 as in its paper; DARE p = 0.5, lambda 1; task arithmetic lambda 1); when none of them meets the
target (or with --tune always), every method's hyper-parameters are chosen on the
validation sets (maximising the worse parent's share kept there) and only then scored on the
test sets, which never steer a choice. Target: the best method keeps >= 90% of each
parent's gain.

Defaults (20 engine steps at lr 2e-4 per parent, 40 for the joint fine-tune; 8 test and 4
validation blocks of 256 tokens per corpus) fit a shared 2-core machine; run
`--train-only joint` in a second process beside the main run to train the joint fine-tune
while the merges are scored.

Every trained adapter and every measured perplexity is cached in --work-dir, so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

from offsite.files import atomic_write

from bench.merging_corpora import corpora, first_blocks

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Validation grids: small on purpose (each point is two plug-in evaluations on 2 shared cores).
GRIDS: dict[str, list[dict]] = {
    "average": [{}],
    "task-arithmetic": [{"scale": s} for s in (0.7, 1.0, 1.3)],
    "ties": [{"density": d, "scale": s} for d in (0.2, 0.5) for s in (1.0, 1.5)],
    "dare": [{"drop_rate": p} for p in (0.3, 0.5, 0.7)],
}
# --grid wide: also lambda below 1 for every method (two related parents share part of their
# deltas, so a plain sum overshoots that part) and unequal parent weights.
GRIDS_WIDE: dict[str, list[dict]] = {
    "average": [{}],
    "task-arithmetic": [{"scale": s} for s in (0.5, 0.6, 0.7, 0.8, 1.0, 1.3)]
    + [{"weights": w} for w in ((0.8, 0.5), (0.7, 0.6), (0.6, 0.7))],
    "ties": [{"density": d, "scale": s} for d in (0.2, 0.5) for s in (0.7, 1.0, 1.5)]
    + [{"density": d, "weights": (1.0, 0.6)} for d in (0.2, 0.5)],
    "dare": [{"drop_rate": p, "scale": s} for p in (0.3, 0.5, 0.7) for s in (0.6, 0.8, 1.0)],
}


def log(msg: str) -> None:
    print(f"[merging {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- training and scoring ----------------------------------------------------------------


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_bundle_once(work: Path, loaded, model: str) -> tuple[Path, Path]:
    from offsite.emulators.build import BuildConfig, build_bundle
    from offsite.emulators.signing import generate_signing_key

    keys = work / "keys"
    key, pub = keys / "signing.key", keys / "signing.pub"
    if not key.exists():
        generate_signing_key(keys)
    out = work / "bundle"
    if not (out / "manifest.json").exists():
        log("building the int3 + AWQ bundle of the default model ...")
        build_bundle(
            BuildConfig(model=model, quantize="int3", awq=True), key, out, progress=False, overwrite=True, loaded=loaded
        )
    return out, pub


def train_parent(
    work: Path, bundle_dir: Path, pub: Path, label: str, examples, steps: int, lr: float, seed: int
) -> dict:
    """The client engine trains the bundle's adapter on `examples`; cached as an adapter file."""
    from offsite.client.engine import TrainConfig, train_adapter
    from offsite.emulators.adapter import load_adapter, save_adapter
    from offsite.emulators.bundle import load_bundle

    bundle = load_bundle(bundle_dir, pub)
    key = _key(
        {"bundle": bundle.manifest_sha256, "label": label, "n": len(examples), "steps": steps, "lr": lr, "seed": seed}
    )
    path = work / f"adapter-{label}-{key}.safetensors"
    marker = path.with_suffix(".training")
    while not path.exists() and marker.exists() and _alive(int(marker.read_text() or 0)):
        time.sleep(10)  # another process (--train-only) is training this one
    if path.exists():
        return load_adapter(path)
    marker.write_text(str(os.getpid()))
    try:
        log(f"training parent {label}: {steps} steps on {len(examples)} documents")
        # checkpoints every 10 steps: an interrupted run resumes (the engine checks the settings match)
        cfg = TrainConfig(
            steps=steps,
            lr=lr,
            batch_size=4,
            block_size=256,
            seed=seed,
            eval_batches=2,
            checkpoint_dir=str(work / f"ckpt-{label}-{key}"),
            checkpoint_every=10,
        )
        t0 = time.perf_counter()
        result = train_adapter(bundle, examples, cfg, progress=False)
        log(f"parent {label} trained in {time.perf_counter() - t0:.0f} s")
        save_adapter(path, result.adapter_state, bundle.base_digest, label=label, steps=str(steps), lr=str(lr))
    finally:
        marker.unlink(missing_ok=True)
    return load_adapter(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


class Scorer:
    """Plug-in perplexity of adapters on named block sets, cached on disk by tag.

    `state` may be a callable that makes the adapter (a merge): it runs only when some
    perplexity of that tag is not cached yet. None means the base model's own blocks."""

    def __init__(self, loaded, sets: dict, base: dict, cache: Path) -> None:
        self.loaded, self.sets, self.base, self.cache = loaded, sets, base, cache
        self.values = json.loads(cache.read_text()) if cache.exists() else {}

    def ppl_all(self, tag: str, state, set_names: list[str]) -> dict[str, float]:
        import torch

        from offsite.emulators.data import perplexity
        from offsite.emulators.plugin import plug_in

        todo = [s for s in set_names if f"{tag}|{s}" not in self.values]
        if todo:
            state = state() if callable(state) else state
            plug_in(self.loaded, self.base if state is None else state, {"base_model_digest": self.loaded.digest})
        for set_name in todo:
            t0 = time.perf_counter()
            with torch.no_grad():
                value = perplexity(self.loaded.model, self.sets[set_name], batch_size=4)
            log(f"{tag:<60} {set_name:<24} ppl {value:8.3f} ({time.perf_counter() - t0:.0f} s)")
            self.values[f"{tag}|{set_name}"] = value
            atomic_write(self.cache, json.dumps(self.values, indent=1))
        return {s: self.values[f"{tag}|{s}"] for s in set_names}

    def restore_base(self) -> None:
        from offsite.emulators.plugin import plug_in

        plug_in(self.loaded, self.base, {"base_model_digest": self.loaded.digest})


def share(zero_shot: float, parent: float, value: float) -> float:
    return (math.log(zero_shot) - math.log(value)) / (math.log(zero_shot) - math.log(parent))


# --- the run -------------------------------------------------------------------------


def run(args) -> dict:
    import torch

    from offsite.emulators.merge import MergeConfig, merge_adapters
    from offsite.emulators.models import load_model

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    bundle_dir, pub = build_bundle_once(work, loaded, args.model)
    data = corpora()
    names = ("python-reference", "stdlib-docs")
    sets = {}
    for n in names:
        _, val, test = data[n]
        sets[f"{n}:test"] = first_blocks(test, loaded.tokenizer, args.test_blocks, 256)
        sets[f"{n}:val"] = first_blocks(val, loaded.tokenizer, args.val_blocks, 256)
    jobs = {
        "A": ("A-python-reference", data[names[0]][0], args.steps),
        "B": ("B-stdlib-docs", data[names[1]][0], args.steps),
        "joint": ("joint", data[names[0]][0] + data[names[1]][0], 2 * args.steps),
    }
    if args.train_only:  # a second process can train one adapter while the main run trains the others
        label, examples, steps = jobs[args.train_only]
        train_parent(work, bundle_dir, pub, label, examples, steps, args.lr, args.seed)
        return {}
    trained = {k: train_parent(work, bundle_dir, pub, *jobs[k][:2], jobs[k][2], args.lr, args.seed) for k in ("A", "B")}
    parents = {"A": trained["A"], "B": trained["B"]}
    from offsite.emulators.merge import base_blocks

    base = base_blocks(loaded.model, loaded.family, parents["A"][0])
    scorer = Scorer(
        loaded,
        sets,
        base,
        work / f"ppl-cache-{_key({'t': args.test_blocks, 'v': args.val_blocks, 's': args.steps, 'lr': args.lr})}.json",
    )
    own = {"A": names[0], "B": names[1]}

    def score_all(tag: str, state, split: str) -> dict[str, float]:
        got = scorer.ppl_all(tag, state, [f"{n}:{split}" for n in names])
        return {n: got[f"{n}:{split}"] for n in names}

    zero = {"test": score_all("zero-shot", None, "test")}
    parent_ppl = {p: {"test": score_all(f"parent {p}", parents[p][0], "test")} for p in parents}

    def shares(ppl: dict[str, float], split: str) -> dict[str, float]:
        return {p: share(zero[split][own[p]], parent_ppl[p][split][own[p]], ppl[own[p]]) for p in parents}

    pair = [parents["A"], parents["B"]]

    def merged(cfg: MergeConfig):
        scorer.restore_base()  # the library takes deltas from the model it is given
        return merge_adapters(loaded, pair, cfg, labels=["parent A", "parent B"])[0]

    def test_row(cfg: MergeConfig) -> dict:
        ppl = score_all(
            f"{cfg.method} {json.dumps(cfg.hyperparameters(), sort_keys=True)}", lambda: merged(cfg), "test"
        )
        s = shares(ppl, "test")
        return {
            "hyperparameters": cfg.hyperparameters(),
            "test_ppl": ppl,
            "share_kept": s,
            "min_share_kept": min(s.values()),
        }

    # First every method with the papers' settings; hyper-parameters are tuned (on the
    # validation sets only) when no method meets the target, or always with --tune always.
    defaults = {m: test_row(MergeConfig(method=m, seed=args.seed)) for m in GRIDS}
    tune = args.tune == "always" or (args.tune == "auto" and max(r["min_share_kept"] for r in defaults.values()) < 0.9)
    methods = {}
    if tune:
        zero["val"] = score_all("zero-shot", None, "val")
        for p in parents:
            parent_ppl[p]["val"] = score_all(f"parent {p}", parents[p][0], "val")
    grids = GRIDS_WIDE if args.grid == "wide" else GRIDS
    for method, grid in grids.items():
        if not tune:
            methods[method] = {**defaults[method], "tuned": False}
            continue
        tried = []
        for hp in grid:
            cfg = MergeConfig(method=method, seed=args.seed, **hp)
            tag = f"{method} {json.dumps(cfg.hyperparameters(), sort_keys=True)}"
            s = shares(score_all(tag, lambda cfg=cfg: merged(cfg), "val"), "val")
            tried.append(
                {"hyperparameters": cfg.hyperparameters(), "val_share_kept": s, "val_min_share": min(s.values())}
            )
        chosen = max(tried, key=lambda t: t["val_min_share"])
        cfg = MergeConfig(**{k: v for k, v in chosen["hyperparameters"].items()})
        methods[method] = {**test_row(cfg), "tuned": True, "defaults": defaults[method], "validation": tried}
    # last, so that a --train-only joint process trains it while the merges are scored
    joint = train_parent(work, bundle_dir, pub, *jobs["joint"][:2], jobs["joint"][2], args.lr, args.seed)[0]
    joint_ppl = score_all("joint fine-tune", joint, "test")
    best = max(methods, key=lambda m: methods[m]["min_share_kept"])
    joint_shares = {p: share(zero["test"][own[p]], parent_ppl[p]["test"][own[p]], joint_ppl[own[p]]) for p in parents}
    return {
        "methods": methods,
        "best_method": best,
        "best_min_share_kept": methods[best]["min_share_kept"],
        "target_min_share": 0.9,
        "meets_target": methods[best]["min_share_kept"] >= 0.9,
        "zero_shot_ppl": zero["test"],
        "parents": {
            p: {
                "corpus": own[p],
                "test_ppl": parent_ppl[p]["test"],
                "own_gain_log_ppl": math.log(zero["test"][own[p]]) - math.log(parent_ppl[p]["test"][own[p]]),
            }
            for p in parents
        },
        "joint_finetune": {"test_ppl": joint_ppl, "share_kept": joint_shares, "steps": 2 * args.steps},
        "config": {
            "model": args.model,
            "bundle": "int3 + AWQ middle, adapter blocks 0,1,28,29",
            "steps": args.steps,
            "lr": args.lr,
            "batch": "4 x 256 tokens",
            "seed": args.seed,
            "threads": args.threads,
            "test_blocks": {k: len(v) for k, v in sets.items() if k.endswith(":test")},
            "val_blocks": {k: len(v) for k, v in sets.items() if k.endswith(":val")},
            "train_documents": {n: len(data[n][0]) for n in names},
            "grid": args.grid,
            "grids": GRIDS_WIDE if args.grid == "wide" else GRIDS,
        },
    }


def print_table(res: dict) -> str:
    a, b = "python-reference", "stdlib-docs"
    lines = [
        "| adapter | hyper-parameters | ppl python-reference | ppl stdlib-docs | A's share kept | B's share kept |",
        "|---|---|---|---|---|---|",
    ]
    z = res["zero_shot_ppl"]
    lines.append(f"| zero-shot | | {z[a]:.3f} | {z[b]:.3f} | | |")
    for p, row in res["parents"].items():
        lines.append(
            f"| parent {p} ({row['corpus']}) | | {row['test_ppl'][a]:.3f} | {row['test_ppl'][b]:.3f} | "
            f"{'100%' if p == 'A' else ''} | {'100%' if p == 'B' else ''} |"
        )
    j = res["joint_finetune"]
    lines.append(
        f"| joint fine-tune ({j['steps']} steps) | | {j['test_ppl'][a]:.3f} | {j['test_ppl'][b]:.3f} | "
        f"{100 * j['share_kept']['A']:.0f}% | {100 * j['share_kept']['B']:.0f}% |"
    )
    for m, row in res["methods"].items():
        for label, r in (
            (("paper settings", row["defaults"]), ("tuned on validation", row))
            if row["tuned"]
            else (("paper settings", row),)
        ):
            hp = ", ".join(
                f"{k}={v}"
                for k, v in r["hyperparameters"].items()
                if k not in ("method", "seed") and not (k == "weights" and v is None)
            )
            lines.append(
                f"| {m} ({label}) | {hp or '-'} | {r['test_ppl'][a]:.3f} | {r['test_ppl'][b]:.3f} | "
                f"{100 * r['share_kept']['A']:.0f}% | {100 * r['share_kept']['B']:.0f}% |"
            )
    text = "\n".join(lines)
    print(text)
    print(
        f"best: {res['best_method']} keeps {100 * res['best_min_share_kept']:.1f}% of the worse parent's gain "
        f"(target >= 90%: {res['meets_target']})"
    )
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=20, help="engine steps per parent (the joint fine-tune gets twice)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-blocks", type=int, default=8, help="256-token test blocks per corpus (0: all)")
    ap.add_argument("--val-blocks", type=int, default=4, help="256-token validation blocks per corpus (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "offsite" / "bench-merging"),
        help="bundle, adapters and measured perplexities (re-running resumes)",
    )
    ap.add_argument(
        "--tune",
        choices=["auto", "always", "never"],
        default="auto",
        help="tune hyper-parameters on the validation sets: when no default meets the target (auto), always, never",
    )
    ap.add_argument("--grid", choices=["small", "wide"], default="small", help="validation grid of hyper-parameters")
    ap.add_argument(
        "--train-only",
        choices=["A", "B", "joint"],
        default=None,
        help="train (and cache) one adapter, then exit: run beside the main run to train in parallel",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args)
    if args.train_only:
        return
    res["table_markdown"] = print_table(res)
    res["wall_seconds"] = time.perf_counter() - t0
    res["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_end": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
