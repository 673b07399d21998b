"""On-disk cache of model outputs (completions and losses), keyed by what produced them.

One JSONL file, appended and fsynced after every batch: an interrupted run loses at most
the batch in flight and resumes where it stopped; re-grading and re-scoring never
regenerate. Each batch is one O_APPEND write, and ``refresh()`` reads what other processes
appended since, so several runs against one base (e.g. four candidates) share its outputs. A key hashes the model's weight digest with everything that determines the
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
        self._offset = 0  # bytes of the file read so far (complete lines only)
        self.hits = 0
        self.misses = 0
        self.refresh()

    def refresh(self) -> None:
        """Read the entries appended to the file since the last read (by this or another process)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
                self._data[row["k"]] = row["v"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                continue  # a line cut short by an interruption: that batch is redone
        self._offset += end

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
        data = "".join(json.dumps({"k": k, "v": v}, ensure_ascii=False) + "\n" for k, v in entries.items()).encode(
            "utf-8"
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)  # one append: lines of concurrent writers never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
        self._data.update(entries)
