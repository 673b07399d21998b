"""Scheduled evals: a due cron schedule runs the real runner and keeps its report as artifacts."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import torch

from offsite.server.eval_scheduler import EvalScheduler, ScheduleError, next_run_after
from offsite.server.registry import utcnow
from offsite.server.state import ServerConfig, ServerState


@pytest.fixture
def state(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_safety_run.py: one thread on a shared CPU
    st = ServerState(ServerConfig(data_dir=tmp_path / "server"))
    yield st
    st.close()
    torch.set_num_threads(before)


def _wait(registry, op_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = registry.get_operation(op_id)
        if op.state in ("succeeded", "failed", "cancelled"):
            return op
        time.sleep(0.2)
    raise AssertionError(f"operation {op_id} did not finish in {timeout}s")


def test_next_run_after_and_bad_cron():
    now = utcnow().replace(hour=1, minute=0, second=0, microsecond=0)
    assert next_run_after("0 3 * * *", now) == now.replace(hour=3)
    with pytest.raises(ScheduleError, match="five fields"):
        next_run_after("every day", now)


def test_due_schedule_runs_and_stores_the_report(state):
    reg = state.registry
    reg.add_model("tiny-llama", "tiny-llama")
    past = utcnow() - timedelta(hours=3)  # the server was down across three hourly runs
    sched = reg.add_eval_schedule(
        "hourly", "0 * * * *", "tiny-llama", "tiny-llama", ["over_refusal"], 2, next_run_at=past
    )
    future = reg.add_eval_schedule(
        "later", "0 * * * *", "tiny-llama", "", ["over_refusal"], 2, next_run_at=utcnow() + timedelta(hours=1)
    )
    scheduler = EvalScheduler(state)
    started = scheduler.tick()
    assert [s["schedule_id"] for s in started] == [sched.id]  # missed runs coalesce into one; `later` is not due
    op = _wait(reg, started[0]["operation_id"])
    assert op.state == "succeeded", op.error
    reports = reg.list_eval_reports(schedule_id=sched.id)
    assert len(reports) == 1 and reports[0].verdict == "block"  # a --limit run never passes the default policy
    stored = json.loads(state.store.path(reports[0].report_json_sha256).read_text())
    assert stored["gate"]["verdict"] == "block" and stored["run"]["limit"] == 2
    assert state.store.path(reports[0].report_html_sha256).read_text().startswith("<!doctype html>")
    row = reg.get_eval_schedule(sched.id)
    assert row.next_run_at > utcnow() and row.last_report_id == reports[0].id
    assert scheduler.tick() == []  # nothing is due any more
    assert reg.get_eval_schedule(future.id).last_run_at is None


def test_a_broken_schedule_is_disabled_and_audited(state):
    reg = state.registry
    sched = reg.add_eval_schedule("bad", "not a cron", "tiny-llama", next_run_at=utcnow() - timedelta(minutes=1))
    started = EvalScheduler(state).tick()
    assert "not a valid cron" in started[0]["error"]
    assert reg.get_eval_schedule(sched.id).enabled is False
    assert any(a.method == "eval.schedule.disable" for a in reg.list_audit())


def test_scheduler_thread_starts_and_stops(state):
    s = EvalScheduler(state, poll_s=0.05).start()
    time.sleep(0.2)
    s.stop()
    assert s._thread is None


def test_the_server_background_task_disables_a_due_broken_schedule(state):
    """`run_scheduler` (what `offsite-admin serve` starts) ticks on its own until cancelled."""
    import asyncio

    from offsite.server.eval_scheduler import run_scheduler
    from offsite.server.hooks import DEFAULT_EVAL_SCHEDULER, load_hook

    assert load_hook(DEFAULT_EVAL_SCHEDULER) is run_scheduler
    sched = state.registry.add_eval_schedule(
        "bad", "not a cron", "tiny-llama", next_run_at=utcnow() - timedelta(minutes=1)
    )

    async def run_briefly():
        task = asyncio.create_task(run_scheduler(state, poll_s=0.05))
        await asyncio.sleep(0.5)
        task.cancel()

    asyncio.run(run_briefly())
    assert state.registry.get_eval_schedule(sched.id).enabled is False
