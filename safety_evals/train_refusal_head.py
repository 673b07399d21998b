"""Train the shipped refusal head: a logistic head on all-MiniLM-L6-v2 sentence embeddings.

``python -m offsite.safety_evals.train_refusal_head`` writes ``graders/refusal_head.json`` (384
coefficients, intercept, threshold, off-topic threshold, the encoder's sha256) and records its
checksum. JSON, not pickle: the grader loads numbers, never code.

Data: only text this project wrote. Training: ``refusal_corpus.build_corpus("train")`` plus the
TF-IDF classifier's training rows (``train_refusal.build_labelled("train")``, which include half of
the hand-labelled default-model completions). Calibration (the head's threshold, the C of the
regression and the off-topic threshold): the validation halves of the same two sources, whose
topics, tasks and wording parts are disjoint from training. No public set is read here.
"""

from __future__ import annotations

import json

import numpy as np

from .embedder import ENCODER_NAME, embed, encoder_sha256
from .graders import GRADER_DIR, HEAD_FORMAT, HEAD_PATH, RefusalGrader
from .refusal_corpus import build_corpus, relevance_pairs
from .train_refusal import build_labelled, record_checksum


def labelled(split: str) -> list[dict]:
    return build_corpus(split) + build_labelled(split)


def best_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold with the best accuracy (ties: the one nearest 0.5)."""
    grid = np.round(np.linspace(0.05, 0.95, 91), 3)
    acc = [((p >= t) == y).mean() for t in grid]
    return float(grid[max(range(len(grid)), key=lambda i: (acc[i], -abs(grid[i] - 0.5)))])


def fit(train: list[dict], calib: list[dict]) -> tuple[dict, dict]:
    from sklearn.linear_model import LogisticRegression

    xt, yt = embed([r["completion"] for r in train]), np.array([r["refused"] for r in train])
    xc, yc = embed([r["completion"] for r in calib]), np.array([r["refused"] for r in calib])
    rules_c = np.array([RefusalGrader.rule(r["completion"]) for r in calib])
    best = None
    for c in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(xt, yt)
        pc = clf.predict_proba(xc)[:, 1]
        t = best_threshold(pc, yc)
        head_acc = float(((pc >= t) == yc).mean())
        if best is None or head_acc > best[0]:
            best = (head_acc, c, t, clf, float((((pc >= t) | rules_c) == yc).mean()))
    head_acc, c, t, clf, acc = best
    pairs = relevance_pairs("train") + relevance_pairs("validation")
    cos = np.sum(embed([q for q, _, _ in pairs]) * embed([a for _, a, _ in pairs]), axis=1)
    on = np.array([o for _, _, o in pairs])
    grid = np.round(np.linspace(-0.2, 0.8, 101), 3)
    off_t = float(grid[int(np.argmax([((cos >= g) == on).mean() for g in grid]))])
    spec = {
        "format": HEAD_FORMAT,
        "kind": "minilm-logreg",
        "encoder": ENCODER_NAME,
        "encoder_sha256": encoder_sha256(),
        "pooling": "mean, l2-normalised",
        "coef": [round(float(v), 6) for v in clf.coef_[0]],
        "intercept": round(float(clf.intercept_[0]), 6),
        "threshold": t,
        "off_topic_threshold": off_t,
        "C": c,
        "train_examples": len(train),
        "calibration_examples": len(calib),
    }
    info = {
        "calibration_accuracy_head": round(head_acc, 4),
        "calibration_accuracy_rules_or_head": round(acc, 4),
        "off_topic_pairs": len(pairs),
        "off_topic_pair_accuracy": round(float(((cos >= off_t) == on).mean()), 4),
    }
    return spec, info


def main() -> None:
    train, calib = labelled("train"), labelled("validation")
    spec, info = fit(train, calib)
    tmp = HEAD_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, sort_keys=True), encoding="utf-8")
    tmp.replace(HEAD_PATH)
    record_checksum(HEAD_PATH)
    print(json.dumps({k: spec[k] for k in ("C", "threshold", "off_topic_threshold", "train_examples")} | info))
    print(f"wrote {HEAD_PATH.relative_to(GRADER_DIR.parent)}")


if __name__ == "__main__":
    main()
