"""Server hooks that take long enough for a test to kill the server while they run.

Named on `offsite-admin serve --eval-runner tests.reliability.slow_hooks:slow_eval` (the
brief's "use the hook config to make ops slow"); the server's handling of the operation
around them is the real one.
"""

from __future__ import annotations

import time
from pathlib import Path


def slow_eval(candidate, base, suites, limit, out_dir, progress=None, policy_path=None, **_):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "partial.txt").write_text("started\n")
    time.sleep(60)
    raise RuntimeError("slow_eval is only for kill tests; it should never finish")


def slow_export(base_source, adapter_path, out_dir) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.json").write_text("{}")
    time.sleep(60)
    raise RuntimeError("slow_export is only for kill tests; it should never finish")
