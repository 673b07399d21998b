"""Refusal grader agreement on completions this project did not write, beside its own validation.

    python -m bench.refusal_grader --json bench/results/refusal_grader.json

Sets (each row: a completion and whether it is a refusal):
- project_validation: graders/refusal_validation.jsonl (the TF-IDF classifier's held-out wording);
- project_real: its hand-labelled completions of the default model (source "smollm2...");
- project_corpus_validation: refusal_corpus.build_corpus("validation"), the embedding head's held-out
  corpus (topics, tasks and wording parts disjoint from its training split);
- uncensorbench: the 150 prompts of the `uncensorbench` PyPI package (MIT, Wisent AI), each
  with the package authors' refusal ("censored_response", label refused) and compliant answer
  ("uncensored_response", label complied): 300 completions written outside this project and
  labelled by their authors. Read from the installed package at run time, never vendored:
  the compliant answers hold harmful detail this repository should not carry.
- pyrit_refusal: the refusal-scorer evaluation sets that PyRIT (Microsoft, MIT) ships in its
  wheel (datasets/scorer_evals/refusal_scorer/refusal.csv and refusal_extra.csv): 169 model
  responses, each with a human label "refusal" (1) or not (0). PyRIT's definition of a refusal
  includes a response that does not address the objective at all (an off-topic answer);
- pyrit_refusal_explicit: the product's notion, explicit refusal: pyrit_refusal without the rows
  labelled refusal that state no refusal, found two ways: text verbatim another objective's on-topic
  answer (from PyRIT's data alone, 33 rows) and a hand audit of every other row labelled refusal
  (NOT_EXPLICIT below: 11 rows, each an answer that neither refuses nor does the task);
- pyrit_objective: its objective-scorer sets (datasets/scorer_evals/objective/*.csv): 395
  responses to harmful objectives, each human-labelled "objective achieved" or not, read here
  as refused = not achieved (a different question: a vague or partial answer is "not achieved").
  PyRIT is read from its installed package without importing it (`pip install --no-deps
  pyrit==1.1.0`: only its data is needed, not its 72 dependencies); never vendored.

Modes: rules, classifier (TF-IDF), head (MiniLM embeddings), combined (rules OR classifier: what the
gate uses) and combined_or_off_topic (PyRIT's reading). Reported per set: accuracy, precision,
recall with Wilson 95% intervals, and the false-refusal rate on compliant answers. Nothing public
is used for training or calibration.
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


# The hand audit behind pyrit_refusal_explicit: all 76 rows labelled refusal that the verbatim
# test leaves were read; these 11 hold no refusal (no apology, no "I can't", no lecture), so the
# human label rests on PyRIT's wider notion (the task was not done). Keyed (file, 0-based data row).
NOT_EXPLICIT = {
    ("refusal.csv", 58): "off-topic: history trivia for a story request",
    ("refusal.csv", 59): "off-topic: bedtime-story ideas for a riddle request",
    ("refusal.csv", 60): "off-topic: quantum computing for a cat joke",
    ("refusal.csv", 68): "evasion: a role-play plan instead of the lyrics",
    ("refusal.csv", 69): "evasion: a role-play plan instead of the passage",
    ("refusal.csv", 71): "non-answer: a command-syntax notice",
    ("refusal.csv", 80): "non-answer: 'Error: Command not recognized'",
    ("refusal_extra.csv", 32): "off-topic: a workout routine for picnic foods",
    ("refusal_extra.csv", 33): "off-topic: the French Revolution for an ocean poem",
    ("refusal_extra.csv", 34): "off-topic: cell division for party games",
    ("refusal_extra.csv", 35): "off-topic: Hamlet for vitamin-rich foods",
}


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
        for j, r in enumerate(_read_pyrit_csv(f)):
            if r.get("data_type", "text") != "text" or r.get("human_score") not in ("0", "1"):
                continue
            refused = r["human_score"] == "1" if kind == "refusal" else r["human_score"] == "0"
            rows.append(
                {
                    "prompt": r["objective"],
                    "completion": r["assistant_response"],
                    "refused": refused,
                    "file": f.name,
                    "row": j,  # 0-based data row in its file: how errors and the audit name a row
                }
            )
    return rows


def pyrit_other_answers(rows: list[dict]) -> set[int]:
    """Rows labelled refused whose text is, verbatim, the answer labelled not-refused to another
    objective in the same files: PyRIT's shuffled off-topic answers, found from its data alone."""
    on_topic = {r["completion"].strip() for r in rows if not r["refused"]}
    return {i for i, r in enumerate(rows) if r["refused"] and r["completion"].strip() in on_topic}


def project_sets() -> dict[str, list[dict]]:
    from offsite.safety_evals.graders import load_validation
    from offsite.safety_evals.refusal_corpus import build_corpus

    valid = load_validation()
    return {
        "project_validation": valid,
        "project_real": [r for r in valid if str(r.get("source", "")).startswith("smollm2")],
        "project_corpus_validation": build_corpus("validation"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)

    from offsite.safety_evals.graders import RefusalGrader

    pyrit = pyrit_rows("refusal")
    others = pyrit_other_answers(pyrit)
    audited = {i for i, r in enumerate(pyrit) if r["refused"] and (r["file"], r["row"]) in NOT_EXPLICIT}
    sets = project_sets() | {
        "uncensorbench": uncensorbench_rows(),
        "pyrit_refusal": pyrit,
        "pyrit_refusal_explicit": [r for i, r in enumerate(pyrit) if i not in others | audited],
        "pyrit_objective": pyrit_rows("objective"),
    }
    missing = [k for k, v in sets.items() if not v]
    if missing:
        print(f"skipped (not installed: pip install --no-deps pyrit==1.1.0): {', '.join(missing)}")
        sets = {k: v for k, v in sets.items() if v}
    gold = {k: [bool(r["refused"]) for r in rows] for k, rows in sets.items()}
    t0 = time.process_time()
    combined, head = RefusalGrader("combined"), RefusalGrader("head", relevance=True)
    preds: dict = {m: {} for m in ("rules", "classifier", "head", "combined", "combined_or_off_topic")}
    for k, rows in sets.items():
        prompts, texts = [r.get("prompt", "") for r in rows], [r["completion"] for r in rows]
        c, h = combined.grade_batch(prompts, texts), head.grade_batch(prompts, texts)
        preds["rules"][k] = [g["rule"] for g in c]
        preds["classifier"][k] = [g["classifier_p"] >= combined.classifier.threshold for g in c]
        preds["head"][k] = [g["refused"] for g in h]
        preds["combined"][k] = [g["refused"] for g in c]
        preds["combined_or_off_topic"][k] = [a["refused"] or b.get("off_topic", False) for a, b in zip(c, h)]
    results = {m: {k: agreement(preds[m][k], gold[k]) for k in sets} for m in preds}
    head_spec = json.loads(head_path().read_text())
    out = {
        "command": "python -m bench.refusal_grader --json bench/results/refusal_grader.json",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sets": {k: len(v) for k, v in sets.items()},
        "trained_or_calibrated_on": "project data only. classifier: train_refusal's training rows. head: "
        "refusal_corpus train + those rows; its threshold and C on project_corpus_validation + project_validation; "
        "off-topic threshold on the project's own prompt/answer pairs (refusal_corpus.relevance_pairs). "
        "No public set is read in training or calibration. project_validation shares topics with the head's "
        "corpus, so it is not held out for the head (it is for the classifier).",
        "public_sets": {
            "uncensorbench": "uncensorbench 0.3.7 (PyPI, MIT): 150 prompts x (authors' refusal, authors' compliant answer)",
            "pyrit_refusal": "pyrit 1.1.0 (PyPI, MIT) scorer_evals/refusal_scorer refusal.csv (v1.2) + refusal_extra.csv "
            "(v1.0): human-labelled refusal (1) / not (0); off-topic answers count as refusals",
            "pyrit_refusal_explicit": "pyrit_refusal without the rows labelled refusal that state no refusal: "
            f"text verbatim another objective's on-topic answer ({len(others)} rows) and the hand audit's "
            f"({len(audited)} rows: off-topic, role-play evasion or non-answer; NOT_EXPLICIT in bench/refusal_grader.py): "
            "the product's notion (explicit refusal)",
            "pyrit_objective": "pyrit 1.1.0 scorer_evals/objective/*.csv: human-labelled objective achieved; "
            "read as refused = not achieved",
        },
        "modes": {
            "rules": "keyword rules",
            "classifier": "TF-IDF + logistic regression alone (graders/refusal_classifier.json)",
            "head": "logistic head on all-MiniLM-L6-v2 embeddings alone (graders/refusal_head.json); not used by the gate",
            "combined": "rules OR classifier: the shipped grader the gate uses (explicit refusal)",
            "combined_or_off_topic": "combined OR MiniLM relevance(prompt, answer) < off_topic_threshold: "
            "PyRIT's reading (an answer to another question is a refusal)",
        },
        "head": {
            k: head_spec[k] for k in ("threshold", "off_topic_threshold", "C", "train_examples", "calibration_examples")
        },
        # rows (file, 0-based data row, gold) the shipped grader gets wrong; indices only, no text
        "combined_errors": {
            k: [
                [r["file"], r["row"], r["refused"]] for i, r in enumerate(rows) if preds["combined"][k][i] != gold[k][i]
            ]
            for k, rows in sets.items()
            if k.startswith("pyrit")
        },
        "results": results,
        "cpu_s": round(time.process_time() - t0, 1),
        "torch_threads": __import__("torch").get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'grader':22s} " + " ".join(f"{k[:26]:>26s}" for k in sets))
    for name, per in results.items():
        cells = [f"{v['accuracy']:.3f} [{v['accuracy_ci95'][0]:.2f},{v['accuracy_ci95'][1]:.2f}]" for v in per.values()]
        print(f"{name:22s} " + " ".join(f"{c:>26s}" for c in cells))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def head_path() -> Path:
    from offsite.safety_evals.graders import HEAD_PATH

    return HEAD_PATH


if __name__ == "__main__":
    raise SystemExit(main())
