"""On-disk cache of model outputs (completions and losses), keyed by what produced them.

One JSONL file, appended and fsynced after every batch: an interrupted run loses at most
the batch in flight and resumes where it stopped; re-grading and re-scoring never
regenerate. A key hashes the model's weight digest with everything that determines the
output (method, rendered prompt, decoding settings), so a changed model or prompt never
reads a stale entry, and identical work (a candidate equal to the base) is done once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class OutputCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "outputs.jsonl"
        self._data: dict[str, object] = {}
        self.hits = 0
        self.misses = 0
        if self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        self._data[row["k"]] = row["v"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by an interruption: that batch is redone

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str):
        return self._data.get(key)

    def count(self, hits: int, misses: int) -> None:
        """Bookkeeping for the report: work found in the cache versus work done now."""
        self.hits += hits
        self.misses += misses

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def put_many(self, entries: dict[str, object]) -> None:
        if not entries:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            for k, v in entries.items():
                fh.write(json.dumps({"k": k, "v": v}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._data.update(entries)
