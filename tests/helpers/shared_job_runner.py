"""A job runner for tests/test_servers_share_postgres.py (loaded by `--job-runner shared_job_runner:run`).

Resumable: it starts after the job's last recorded round. Each round records the pid of
the server process that ran it, and every run appends "PID start FIRST_ROUND" and "PID end HOW" to work_dir/runs.log,
so the test can see which server ran what and that no round ran twice. With
SHARED_RUNNER_PAUSE_AFTER=N a run that started at round 1 waits after round N until it is
cancelled (a long round, from the outside).
"""

from __future__ import annotations

import os
import time


def run(ctx) -> None:
    rounds = int(ctx.job.spec["rounds"])
    last = ctx.last_round()
    first = last.number + 1 if last else 1
    log = ctx.work_dir / "runs.log"
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()} start {first}\n")
    how = "failed"
    try:
        adapter = ctx.work_dir / f"adapter-{os.getpid()}.safetensors"
        adapter.write_bytes(os.urandom(256))
        pause_after = int(os.environ.get("SHARED_RUNNER_PAUSE_AFTER", "0"))
        for n in range(first, rounds + 1):
            ctx.progress((n - 1) / rounds, f"round {n}")
            time.sleep(0.2)
            ctx.record_round(n, {"pid": os.getpid()}, adapter)
            if first == 1 and n == pause_after:
                while True:  # only a cancel (through either server) ends this
                    ctx.progress(n / rounds, "paused")
                    time.sleep(0.1)
        ctx.create_release(adapter, {"pid": os.getpid()})
        how = "completed"
    except Exception as e:
        how = "cancelled" if type(e).__name__ == "OperationCancelled" else "failed"
        raise
    finally:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} end {how}\n")
