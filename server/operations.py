"""Long-running work off the event loop, with progress, cancellation and a durable record.

Work runs in a thread pool (torch releases the GIL for the heavy parts), reports progress
through an :class:`OperationContext`, and may be cancelled: the next ``ctx.progress`` or
``ctx.check_cancelled`` call raises :class:`OperationCancelled`. Every state change is
written to the registry, so GetOperation works after a restart; an operation that was
running when the server died is marked failed at the next start (its thread is gone).
Watchers on the event loop get each change pushed to them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offsite.files import is_disk_full

from .leases import Leases
from .registry import OperationRow, Registry

log = logging.getLogger(__name__)

DONE_STATES = ("succeeded", "failed", "cancelled")
LONG_KINDS = ("job-run",)  # operation kinds that run in the long-job pool


class OperationCancelled(Exception):
    """Raised inside work when its operation was cancelled."""


class ShuttingDown(RuntimeError):
    """No new operations: the server is stopping."""


@dataclass
class OperationResult:
    resource: str = ""
    result: dict[str, Any] = field(default_factory=dict)


class OperationContext:
    """Handed to the work function: report progress, notice cancellation."""

    def __init__(self, manager: OperationManager, op_id: str, cancel_event: threading.Event) -> None:
        self._manager = manager
        self.op_id = op_id
        self._cancel = cancel_event
        self._last_write = 0.0
        self._last_fraction = -1.0

    def track_process(self, proc) -> None:
        """A child process (started with start_new_session=True) that this work waits on:
        cancelling the operation, or a server shutdown, terminates its process group."""
        self._manager._track(self.op_id, proc)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise OperationCancelled(f"operation {self.op_id} was cancelled")

    def progress(self, fraction: float, message: str = "") -> None:
        """Record progress in [0, 1]; raises OperationCancelled when cancelled.

        Writes are throttled (every 0.25 s or 1%) so a chatty loop does not load the database.
        """
        self.check_cancelled()
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if now - self._last_write < 0.25 and abs(fraction - self._last_fraction) < 0.01 and fraction < 1.0:
            return
        self._last_write, self._last_fraction = now, fraction
        self._manager._update(self.op_id, progress=fraction, message=message[:500])


class OperationManager:
    def __init__(self, registry: Registry, max_workers: int = 2, long_workers: int = 2) -> None:
        self.registry = registry
        # Two pools: federated jobs run for hours, so they get their own workers and can never
        # hold up the short operations (builds, evals, exports) behind them.
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="offsite-op")
        self._long_executor = ThreadPoolExecutor(max_workers=long_workers, thread_name_prefix="offsite-job")
        self._cancel: dict[str, threading.Event] = {}
        self._futures: dict[str, Future] = {}
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._procs: dict[str, list] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._lock = threading.Lock()
        # Several servers may share one PostgreSQL registry: each holds a lease on the
        # operations it runs, and notices a cancel that another server wrote to the registry.
        self.leases = Leases(registry.url)
        self._leases: dict[str, Any] = {}
        if self.leases.shared:
            threading.Thread(target=self._watch_remote_cancels, name="offsite-op-cancels", daemon=True).start()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def recover(self, scratch_dir: Path | None = None) -> int:
        """Mark operations left running by a previous process as failed; returns how many.

        Their scratch directories (``KIND-OPID-*`` under `scratch_dir`, made with mkdtemp by
        the work) are removed: no thread will ever finish or clean them up (issue 16)."""
        stale = [
            row
            for row in self.registry.list_operations(states=("pending", "running"))
            if self.leases.orphaned(f"op:{row.id}")
        ]  # another live server's work is not stale
        for row in stale:
            self.registry.update_operation(
                row.id, state="failed", error="the server stopped while this ran; start it again"
            )
            if scratch_dir is not None and Path(scratch_dir).is_dir():
                for left in Path(scratch_dir).glob(f"*-{row.id}-*"):
                    shutil.rmtree(left, ignore_errors=True)
        return len(stale)

    # ---- starting and running ---------------------------------------------------------------
    def start(
        self,
        kind: str,
        work: Callable[[OperationContext], OperationResult | None],
        created_by: str = "",
        on_finish: Callable[[OperationRow], None] | None = None,
    ) -> OperationRow:
        if self._closing:
            raise ShuttingDown("the server is shutting down; start the operation again after it restarts")
        row = self.registry.add_operation(kind, created_by=created_by)
        cancel = threading.Event()
        lease = self.leases.hold(f"op:{row.id}")
        lease.__enter__()  # held from now (queued too) until _run ends
        with self._lock:
            self._leases[row.id] = lease
            self._cancel[row.id] = cancel
            pool = self._long_executor if kind in LONG_KINDS else self._executor
            self._futures[row.id] = pool.submit(self._run, row.id, work, cancel, on_finish)
        return row

    def _run(self, op_id: str, work, cancel: threading.Event, on_finish) -> None:
        if cancel.is_set():
            self._update(op_id, state="cancelled", message="cancelled before it started")
        else:
            self._update(op_id, state="running", message="started")
            ctx = OperationContext(self, op_id, cancel)
            try:
                outcome = work(ctx) or OperationResult()
                if cancel.is_set():
                    raise OperationCancelled("cancelled")
                self._update(
                    op_id,
                    state="succeeded",
                    progress=1.0,
                    message="done",
                    resource=outcome.resource,
                    result=outcome.result,
                )
            except OperationCancelled:
                self._update(op_id, state="cancelled", message="cancelled")
            except Exception as e:  # the error is the operation's result, not the server's
                log.warning("operation %s failed: %s\n%s", op_id, e, traceback.format_exc())
                error = f"{type(e).__name__}: {e}"
                if is_disk_full(e):
                    error = (
                        "the server's disk is full; nothing was stored (free space under the data "
                        f"directory, then start it again): {error}"
                    )
                self._update(op_id, state="failed", error=error[:4000])
        with self._lock:
            self._cancel.pop(op_id, None)
            self._futures.pop(op_id, None)
            self._procs.pop(op_id, None)
            lease = self._leases.pop(op_id, None)
        if lease is not None:
            lease.__exit__(None, None, None)
        if on_finish is not None:
            try:
                on_finish(self.registry.get_operation(op_id))
            except Exception:
                log.exception("on_finish hook of operation %s failed", op_id)

    def _track(self, op_id: str, proc) -> None:
        with self._lock:
            self._procs.setdefault(op_id, []).append(proc)
            cancelled = self._cancel.get(op_id) is not None and self._cancel[op_id].is_set()
        if cancelled:
            _terminate_group(proc)

    def _terminate_children(self, op_id: str) -> None:
        with self._lock:
            procs = list(self._procs.get(op_id, ()))
        for proc in procs:
            _terminate_group(proc)

    def _update(self, op_id: str, **fields: Any) -> None:
        row = self.registry.update_operation(op_id, **fields)
        self._publish(row)

    def _publish(self, row: OperationRow) -> None:
        loop, queues = self._loop, list(self._watchers.get(row.id, ()))
        if loop is None or not queues:
            return
        for q in queues:
            try:
                loop.call_soon_threadsafe(q.put_nowait, row)
            except RuntimeError:  # loop closed during shutdown
                pass

    # ---- control ------------------------------------------------------------------------------
    def cancel(self, op_id: str) -> OperationRow:
        row = self.registry.get_operation(op_id)
        if row.state in DONE_STATES:
            return row
        with self._lock:
            event = self._cancel.get(op_id)
            future = self._futures.get(op_id)
        if event is None:
            # Not ours: left over from a dead process, or run by another server sharing this
            # registry (whose _watch_remote_cancels stops the work when it reads this state).
            return self.registry.update_operation(op_id, state="cancelled", message="cancelled")
        event.set()
        self._terminate_children(op_id)  # work blocked in a child process notices at once
        if future is not None and future.cancel():
            self._update(op_id, state="cancelled", message="cancelled before it started")
            with self._lock:
                self._futures.pop(op_id, None)
                lease = self._leases.pop(op_id, None)
            if lease is not None:
                lease.__exit__(None, None, None)
        return self.registry.get_operation(op_id)

    def _watch_remote_cancels(self, every_s: float = 1.0) -> None:
        """Stop local work whose operation another server marked cancelled in the shared registry."""
        while not self._closing:
            time.sleep(every_s)
            for op_id in self.running_ids():
                try:
                    row = self.registry.get_operation(op_id)
                except Exception:  # noqa: BLE001 - the database is briefly away: look again next time
                    continue
                with self._lock:
                    event = self._cancel.get(op_id)
                if row.state == "cancelled" and event is not None and not event.is_set():
                    log.warning("operation %s was cancelled through another server; stopping it", op_id)
                    event.set()
                    self._terminate_children(op_id)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._futures)

    async def watch(self, op_id: str) -> AsyncIterator[OperationRow]:
        """Yield the operation now and after every change until it is done."""
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.setdefault(op_id, set()).add(queue)
        try:
            row = self.registry.get_operation(op_id)
            yield row
            while row.state not in DONE_STATES:
                try:
                    row = await asyncio.wait_for(queue.get(), timeout=5.0)
                except asyncio.TimeoutError:
                    # A change published by another process sharing the registry.
                    fresh = self.registry.get_operation(op_id)
                    if fresh.updated_at == row.updated_at and fresh.state == row.state:
                        continue
                    row = fresh
                yield row
        finally:
            watchers = self._watchers.get(op_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    self._watchers.pop(op_id, None)

    async def shutdown(self, grace_s: float = 10.0) -> list[str]:
        """Let running work finish within `grace_s`, then cancel what is left (terminating its
        child processes) and give it two more seconds. Returns the ids of work that still
        ignores cancellation: its threads cannot be stopped, so the caller should exit the
        process rather than wait for them (``offsite-admin serve`` does)."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self.running_ids() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.running_ids()
        for op_id in left:
            log.warning("cancelling operation %s at shutdown", op_id)
            self.cancel(op_id)
        deadline = time.monotonic() + 2.0
        while self.running_ids() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stuck = self.running_ids()
        for op_id in stuck:
            # Work that ignores cancellation: record the truth, the thread dies with the process.
            self._terminate_children(op_id)
            self.registry.update_operation(op_id, state="cancelled", message="cancelled at server shutdown")
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._long_executor.shutdown(wait=False, cancel_futures=True)
        return stuck


def _terminate_group(proc, grace_s: float = 3.0) -> None:
    """SIGTERM a child's process group now; SIGKILL it from a timer if it is still there after `grace_s`."""
    if proc.poll() is not None:
        return

    def signal_group(sig) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    signal_group(signal.SIGTERM)
    timer = threading.Timer(grace_s, signal_group, args=(signal.SIGKILL,))
    timer.daemon = True
    timer.start()
