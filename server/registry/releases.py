"""Releases (candidates the gate decides on) and the safety evals: reports and schedules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from .errors import Conflict, NotFound
from .store import Store
from .tables import RELEASE_STATUSES, EvalReportRow, EvalScheduleRow, JobRow, ReleaseRow, new_id, utcnow


class Releases(Store):
    """Releases, eval reports and eval schedules."""

    # ---- releases -------------------------------------------------------------------------
    def create_release(
        self,
        job_id: str,
        model_id: str,
        adapter_sha256: str,
        metrics: dict | None = None,
        status: str = "pending-gate",
        parents: list[str] | None = None,
    ) -> ReleaseRow:
        """A candidate release from a finished job, or merged from `parents` (status pending-gate until the gate decides)."""
        if status not in RELEASE_STATUSES:
            raise ValueError(f"release status {status!r} is not one of {RELEASE_STATUSES}")
        row = ReleaseRow(
            id=new_id("rel"),
            job_id=job_id,
            model_id=model_id,
            adapter_sha256=adapter_sha256,
            metrics=metrics or {},
            status=status,
            parent_ids=list(parents or []),
        )
        with self.session() as s:
            s.add(row)
            if job_id and s.get(JobRow, job_id) is not None:
                s.get(JobRow, job_id).release_id = row.id
                self._event(s, job_id, "release", {"release_id": row.id, "status": status})
        return row

    def get_release(self, release_id: str) -> ReleaseRow:
        return self._get(ReleaseRow, release_id, "release")

    def list_releases(
        self, status: str | None = None, job_id: str | None = None, limit: int | None = None
    ) -> list[ReleaseRow]:
        stmt = select(ReleaseRow).order_by(ReleaseRow.created_at)
        if status:
            stmt = stmt.where(ReleaseRow.status == status)
        if job_id:
            stmt = stmt.where(ReleaseRow.job_id == job_id)
        return self._list(stmt, limit)

    def update_release(
        self, release_id: str, expect_status: tuple[str, ...] | None = None, **fields: Any
    ) -> ReleaseRow:
        """Change a release; with `expect_status`, only from one of those statuses (checked in the transaction)."""
        if "status" in fields and fields["status"] not in RELEASE_STATUSES:
            raise ValueError(f"release status {fields['status']!r} is not one of {RELEASE_STATUSES}")
        with self.session() as s:
            row = s.get(ReleaseRow, release_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no release with id {release_id!r}")
            if expect_status is not None and row.status not in expect_status:
                raise Conflict(f"release {release_id} is {row.status!r}; this needs one of {list(expect_status)}")
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = utcnow()
            return row

    # ---- evals ----------------------------------------------------------------------------
    def add_eval_report(
        self,
        candidate: str,
        base: str,
        verdict: str,
        categories: list[dict],
        report_json_sha256: str = "",
        report_html_sha256: str = "",
        summary: dict | None = None,
        release_id: str = "",
        schedule_id: str = "",
        operation_id: str = "",
    ) -> EvalReportRow:
        row = EvalReportRow(
            id=new_id("rep"),
            candidate=candidate,
            base=base,
            verdict=verdict,
            categories=categories,
            report_json_sha256=report_json_sha256,
            report_html_sha256=report_html_sha256,
            summary=summary or {},
            release_id=release_id,
            schedule_id=schedule_id,
            operation_id=operation_id,
        )
        with self.session() as s:
            s.add(row)
            if schedule_id and (sched := s.get(EvalScheduleRow, schedule_id)) is not None:
                sched.last_report_id = row.id
        return row

    def update_eval_report_summary(self, report_id: str, **fields: Any) -> EvalReportRow:
        """Merge `fields` into a report's summary (the gate records whether its verdict applied)."""
        with self.session() as s:
            row = s.get(EvalReportRow, report_id)
            if row is None:
                raise NotFound(f"no eval report with id {report_id!r}")
            row.summary = {**(row.summary or {}), **fields}
            return row

    def get_eval_report(self, report_id: str) -> EvalReportRow:
        return self._get(EvalReportRow, report_id, "eval report")

    def list_eval_reports(
        self, release_id: str | None = None, schedule_id: str | None = None, limit: int | None = None
    ) -> list[EvalReportRow]:
        stmt = select(EvalReportRow).order_by(EvalReportRow.created_at.desc())
        if release_id:
            stmt = stmt.where(EvalReportRow.release_id == release_id)
        if schedule_id:
            stmt = stmt.where(EvalReportRow.schedule_id == schedule_id)
        return self._list(stmt, limit)

    def add_eval_schedule(
        self,
        name: str,
        cron: str,
        candidate: str,
        base: str = "",
        suites: list[str] | None = None,
        limit: int = 0,
        next_run_at: datetime | None = None,
    ) -> EvalScheduleRow:
        row = EvalScheduleRow(
            id=new_id("sch"),
            name=name,
            cron=cron,
            candidate=candidate,
            base=base,
            suites=suites or [],
            limit=limit,
            next_run_at=next_run_at,
        )
        with self.session() as s:
            s.add(row)
        return row

    def get_eval_schedule(self, schedule_id: str) -> EvalScheduleRow:
        return self._get(EvalScheduleRow, schedule_id, "eval schedule")

    def list_eval_schedules(self, enabled_only: bool = False, limit: int | None = None) -> list[EvalScheduleRow]:
        stmt = select(EvalScheduleRow).order_by(EvalScheduleRow.created_at)
        if enabled_only:
            stmt = stmt.where(EvalScheduleRow.enabled.is_(True))
        return self._list(stmt, limit)

    def due_eval_schedules(self, now: datetime | None = None) -> list[EvalScheduleRow]:
        """Enabled schedules whose next run is at or before `now` (the eval scheduler polls this)."""
        now = now or utcnow()
        stmt = select(EvalScheduleRow).where(EvalScheduleRow.enabled.is_(True), EvalScheduleRow.next_run_at <= now)
        return self._list(stmt, None)

    def update_eval_schedule(self, schedule_id: str, **fields: Any) -> EvalScheduleRow:
        with self.session() as s:
            row = s.get(EvalScheduleRow, schedule_id)
            if row is None:
                raise NotFound(f"no eval schedule with id {schedule_id!r}")
            for k, v in fields.items():
                setattr(row, k, v)
            return row

    def claim_eval_schedule(self, schedule_id: str, now: datetime, next_run_at: datetime) -> bool:
        """Move a due schedule to its next run, only if it is still due: of several servers
        sharing the registry exactly one gets True for a given run (a conditional UPDATE)."""
        with self.session() as s:
            result = s.execute(
                update(EvalScheduleRow)
                .where(
                    EvalScheduleRow.id == schedule_id,
                    EvalScheduleRow.enabled.is_(True),
                    EvalScheduleRow.next_run_at <= now,
                )
                .values(next_run_at=next_run_at, last_run_at=now)
            )
            return result.rowcount == 1

    def delete_eval_schedule(self, schedule_id: str) -> None:
        with self.session() as s:
            row = s.get(EvalScheduleRow, schedule_id)
            if row is None:
                raise NotFound(f"no eval schedule with id {schedule_id!r}")
            s.delete(row)
