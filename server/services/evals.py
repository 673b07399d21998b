"""The Evals servicer: eval runs (the gate), reports, schedules."""

from __future__ import annotations

from google.protobuf import empty_pb2

from offsite.protos.v1 import evals_pb2, evals_pb2_grpc

from .. import convert
from ..auth import current_principal
from ..gate import gate_base_model, start_eval
from ..registry import utcnow
from ..state import ServerState
from .common import limit_of, require, suite_names


class EvalsService(evals_pb2_grpc.EvalsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def RunEval(self, request, context):
        if request.limit < 0:
            raise ValueError("limit must be >= 0 (0 = every item)")
        row = start_eval(
            self.s,
            require(request.candidate, "candidate"),
            request.base,
            suite_names(request.suites),
            request.limit,
            created_by=current_principal().name,
        )
        return convert.operation(row)

    async def GetEvalReport(self, request, context):
        return convert.eval_report(self.s.registry, self.s.registry.get_eval_report(require(request.id, "id")))

    async def ListEvalReports(self, request, context):
        rows = self.s.registry.list_eval_reports(
            release_id=request.release_id or None,
            schedule_id=request.schedule_id or None,
            limit=limit_of(request.limit),
        )
        return evals_pb2.ListEvalReportsResponse(reports=[convert.eval_report(self.s.registry, r) for r in rows])

    async def CreateEvalSchedule(self, request, context):
        from croniter import croniter

        cron = require(request.cron.strip(), "cron")
        if not croniter.is_valid(cron):
            raise ValueError(f"cron {cron!r} is not a valid cron expression (five fields, e.g. '0 3 * * *')")
        candidate = require(request.candidate, "candidate")
        if candidate.startswith("rel_"):
            gate_base_model(self.s, self.s.registry.get_release(candidate), request.base)
        else:
            self.s.registry.get_model(candidate)
            if request.base:
                self.s.registry.get_model(request.base)
        if request.limit < 0:
            raise ValueError("limit must be >= 0")
        now = utcnow()
        next_run = croniter(cron, now).get_next(type(now))
        row = self.s.registry.add_eval_schedule(
            request.name or f"{candidate}-{cron}",
            cron,
            candidate,
            request.base,
            suite_names(request.suites),
            request.limit,
            next_run_at=next_run,
        )
        return convert.eval_schedule(row)

    async def ListEvalSchedules(self, request, context):
        return evals_pb2.ListEvalSchedulesResponse(
            schedules=[
                convert.eval_schedule(r) for r in self.s.registry.list_eval_schedules(limit=limit_of(request.limit))
            ]
        )

    async def DeleteEvalSchedule(self, request, context):
        self.s.registry.delete_eval_schedule(require(request.id, "id"))
        return empty_pb2.Empty()
