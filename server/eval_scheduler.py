"""Scheduled safety evals: run the eval suites on cron schedules against releases or models.

The scheduler polls the registry for due schedules (``Registry.due_eval_schedules``),
starts each run through the same path as the RunEval RPC (``gate.start_eval``: an
operation that stores report.json/html/md and samples.jsonl as artifacts and an
``eval_reports`` row linked to the schedule, and updates a release's gate verdict), and
moves the schedule to its next cron time.

Missed runs (the server was down across several cron times) are coalesced into one run:
an eval of the same release twice in a row adds nothing. The next time is computed and
stored *before* the run starts, so a crash while starting never loops on one schedule.

The server runs :func:`run_scheduler` as a background task on its event loop (the
``DEFAULT_EVAL_SCHEDULER`` hook); embedders may instead use ``EvalScheduler(state).start()``
and ``.stop()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime
from typing import Callable

from croniter import croniter

from .registry import utcnow
from .state import ServerState

log = logging.getLogger(__name__)

SCHEDULER_ACTOR = "eval-scheduler"


class ScheduleError(ValueError):
    """A schedule cannot run (bad cron expression, unknown candidate)."""


def next_run_after(cron: str, after: datetime) -> datetime:
    """The first cron time strictly after `after` (naive UTC, like the registry)."""
    if not croniter.is_valid(cron):
        raise ScheduleError(f"cron {cron!r} is not a valid cron expression (five fields, UTC, e.g. '0 3 * * *')")
    return croniter(cron, after).get_next(datetime)


class EvalScheduler:
    def __init__(
        self,
        state: ServerState,
        poll_s: float = 30.0,
        start_eval: Callable[..., object] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.state = state
        self.poll_s = poll_s
        self.clock = clock
        if start_eval is None:
            from .gate import start_eval as _start

            start_eval = _start
        self._start_eval = start_eval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, now: datetime | None = None) -> list[dict]:
        """Start every due schedule once; returns what was started (or why not)."""
        now = now or self.clock()
        started: list[dict] = []
        reg = self.state.registry
        for sched in reg.due_eval_schedules(now):
            try:
                nxt = next_run_after(sched.cron, now)
            except ScheduleError as e:
                # A schedule that can never run again is disabled rather than retried every poll.
                reg.update_eval_schedule(sched.id, enabled=False)
                reg.audit(
                    SCHEDULER_ACTOR, "admin", "eval.schedule.disable", target=sched.id, outcome="error", detail=str(e)
                )
                started.append({"schedule_id": sched.id, "error": str(e)})
                continue
            if not reg.claim_eval_schedule(sched.id, now, nxt):
                continue  # another server sharing this registry started this run
            try:
                op = self._start_eval(
                    self.state,
                    sched.candidate,
                    sched.base,
                    list(sched.suites or []) or None,
                    int(sched.limit or 0),
                    created_by=f"{SCHEDULER_ACTOR}:{sched.id}",
                    schedule_id=sched.id,
                )
            except Exception as e:  # noqa: BLE001 - one broken schedule must not stop the others
                log.error("eval schedule %s could not start: %s", sched.id, e)
                reg.audit(
                    SCHEDULER_ACTOR, "admin", "eval.schedule.run", target=sched.id, outcome="error", detail=str(e)
                )
                started.append({"schedule_id": sched.id, "error": f"{type(e).__name__}: {e}"})
                continue
            op_id = getattr(op, "id", str(op))
            reg.audit(SCHEDULER_ACTOR, "admin", "eval.schedule.run", target=sched.id, detail=f"operation {op_id}")
            started.append({"schedule_id": sched.id, "operation_id": op_id, "next_run_at": nxt.isoformat()})
        return started

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep polling through a transient database error
                log.exception("eval scheduler tick failed")
            self._stop.wait(self.poll_s)

    def start(self) -> "EvalScheduler":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="eval-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


async def run_scheduler(state: ServerState, poll_s: float = 30.0) -> None:
    """The server's background task: tick every `poll_s` until the server cancels it.

    Each tick touches SQLite and may start operations, so it runs in a worker thread and
    never blocks the event loop that serves RPCs.
    """
    scheduler = EvalScheduler(state, poll_s=poll_s)
    while True:
        try:
            await asyncio.to_thread(scheduler.tick)
        except Exception:  # noqa: BLE001 - keep polling through a transient database error
            log.exception("eval scheduler tick failed")
        await asyncio.sleep(poll_s)
