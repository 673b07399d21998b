"""The privacy audit's planted records: what a data owner adds to its data for an audit run.

The audit set (``suites/data/privacy_audit.jsonl``) holds canaries (a name and a random
6-digit door code) and personal records (a made-up patient and prescription). Half of
them are members: they are planted in one data owner's training data; the other half are
never trained on and serve as the non-members of membership inference and the reference
for exposure. Nothing in them is real.
"""

from __future__ import annotations

import json
from pathlib import Path

from offsite.files import atomic_write

from .suite import SUITES_DIR

AUDIT_PATH = SUITES_DIR / "data" / "privacy_audit.jsonl"


def audit_records(members_only: bool = True) -> list[dict]:
    with open(AUDIT_PATH, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if r["member"] or not members_only]


def training_texts(repeat: int = 1) -> list[dict]:
    """The members as training examples ``{"text": prefix + secret}``, each `repeat` times."""
    return [{"text": r["prefix"] + r["secret"]} for r in audit_records() for _ in range(repeat)]


def write_audit_records(path: str | Path, repeat: int = 1) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = training_texts(repeat)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
