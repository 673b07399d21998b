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


def rounds_runner(ctx) -> None:
    """A resumable job runner (as the federation runner is: it starts after the job's last
    recorded round) that can hang where a test wants to kill the server: RELIABILITY_PAUSE=
    "round-2" hangs inside round 2, "after-release" right after the candidate is created."""
    import os

    pause = os.environ.get("RELIABILITY_PAUSE", "")
    rounds = int(ctx.job.spec.get("rounds") or 3)
    last = ctx.last_round()
    adapter = ctx.work_dir / "adapter.safetensors"
    if not adapter.exists():
        adapter.write_bytes(b"\0" * 256)
    for n in range((last.number + 1) if last else 1, rounds + 1):
        ctx.progress((n - 1) / rounds, f"round {n}")
        if pause == f"round-{n}":
            time.sleep(600)
        adapter.write_bytes(bytes([n]) * 256)
        ctx.record_round(n, {"round": n}, adapter)
    ctx.create_release(adapter, {"rounds": rounds})
    if pause == "after-release":
        time.sleep(600)
