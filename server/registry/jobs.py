"""Federated jobs: their state machine, the data owners enrolled, rounds and the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from .errors import Conflict, NotFound
from .store import Store
from .tables import JOB_STATES, EnrollmentRow, JobEventRow, JobRow, RoundRow, TokenRow, new_id, utcnow


class Jobs(Store):
    """Jobs, enrollments, rounds and job events."""

    # ---- jobs, enrollments, rounds, events --------------------------------------------------
    def add_job(
        self, name: str, model_id: str, emulator_id: str, spec: dict, created_by: str = "", federation_address: str = ""
    ) -> JobRow:
        row = JobRow(
            id=new_id("job"),
            name=name,
            model_id=model_id,
            emulator_id=emulator_id,
            spec=spec,
            created_by=created_by,
            federation_address=federation_address,
        )
        with self.session() as s:
            s.add(row)
            self._event(s, row.id, "created", {"name": name, "emulator_id": emulator_id})
        return row

    def get_job(self, job_id: str) -> JobRow:
        return self._get(JobRow, job_id, "job")

    def list_jobs(
        self, state: str | None = None, job_ids: list[str] | None = None, limit: int | None = None
    ) -> list[JobRow]:
        stmt = select(JobRow).order_by(JobRow.created_at)
        if state:
            stmt = stmt.where(JobRow.state == state)
        if job_ids is not None:
            stmt = stmt.where(JobRow.id.in_(job_ids))
        return self._list(stmt, limit)

    def update_job(self, job_id: str, expect_state: tuple[str, ...] | None = None, **fields: Any) -> JobRow:
        """Set job fields; a state change is also appended to the job's events. With
        `expect_state`, only from one of those states (checked in the transaction)."""
        with self.session() as s:
            # FOR UPDATE: servers sharing one PostgreSQL registry check-and-set in turn (no double start).
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            if expect_state is not None and row.state not in expect_state:
                raise Conflict(f"job {job_id} is {row.state!r}; this needs one of {list(expect_state)}")
            old_state = row.state
            for k, v in fields.items():
                if not hasattr(JobRow, k):
                    raise AttributeError(f"jobs has no column {k!r}")
                setattr(row, k, v)
            row.updated_at = utcnow()
            if "state" in fields and fields["state"] != old_state:
                if fields["state"] not in JOB_STATES:
                    raise ValueError(f"job state {fields['state']!r} is not one of {JOB_STATES}")
                self._event(s, job_id, "state", {"from": old_state, "to": fields["state"], "error": row.error})
            return row

    def enroll(self, job_id: str, data_owner: str, token_id: str = "") -> tuple[EnrollmentRow, bool]:
        """Enroll a data owner under a token (idempotent). Returns (row, created).

        An enrollment belongs to the token that made it: another data-owner token with the same
        name cannot take it over while that token is live (Conflict); an enrollment made by an
        admin on a data owner's behalf, or one whose token was revoked, passes to the data
        owner's token when it enrolls."""
        with self.session() as s:
            existing = s.scalar(
                select(EnrollmentRow).where(EnrollmentRow.job_id == job_id, EnrollmentRow.data_owner == data_owner)
            )
            if existing is not None and existing.ended_at is None:
                if existing.token_id == token_id or not token_id:
                    return existing, False
                holder = s.get(TokenRow, existing.token_id) if existing.token_id else None
                mine = s.get(TokenRow, token_id)
                holder_live = holder is not None and holder.revoked_at is None
                if holder_live and holder.role == "data-owner":
                    if mine is not None and mine.role != "data-owner":
                        return existing, False  # an admin re-enrolling someone: nothing changes
                    raise Conflict(
                        f"data owner {data_owner!r} is enrolled in job {job_id} with another token "
                        f"({existing.token_id}); revoke that token first (offsite-admin tokens revoke)"
                    )
                if mine is not None and mine.role != "data-owner":
                    return existing, False
                existing.token_id = token_id
                return existing, False
            if existing is not None:  # ended by a revocation: a new token enrolls again
                existing.token_id, existing.ended_at, existing.created_at = token_id, None, utcnow()
                self._event(s, job_id, "enrolled", {"data_owner": data_owner})
                return existing, True
            row = EnrollmentRow(job_id=job_id, data_owner=data_owner, token_id=token_id)
            s.add(row)
            self._event(s, job_id, "enrolled", {"data_owner": data_owner})
            return row, True

    def enrolled_data_owners(self, job_id: str) -> list[str]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(EnrollmentRow.data_owner)
                    .where(EnrollmentRow.job_id == job_id, EnrollmentRow.ended_at.is_(None))
                    .order_by(EnrollmentRow.id)
                )
            )

    def jobs_of_data_owner(self, data_owner: str) -> list[str]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(EnrollmentRow.job_id).where(
                        EnrollmentRow.data_owner == data_owner, EnrollmentRow.ended_at.is_(None)
                    )
                )
            )

    def jobs_of_token(self, token_id: str) -> list[str]:
        """The jobs a token is enrolled in (its live enrollments)."""
        if not token_id:
            return []
        with self.session() as s:
            return list(
                s.scalars(
                    select(EnrollmentRow.job_id).where(
                        EnrollmentRow.token_id == token_id, EnrollmentRow.ended_at.is_(None)
                    )
                )
            )

    def add_round(self, job_id: str, number: int, metrics: dict, adapter_sha256: str = "") -> RoundRow:
        """Record a completed round (the federation's job runner calls this every round).

        Also advances the job's current_round and appends a "round" event, in one transaction.
        """
        with self.session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise NotFound(f"no job with id {job_id!r}")
            row = s.scalar(select(RoundRow).where(RoundRow.job_id == job_id, RoundRow.number == number))
            if row is None:
                row = RoundRow(job_id=job_id, number=number)
                s.add(row)
            row.metrics = metrics
            row.adapter_sha256 = adapter_sha256
            job.current_round = max(job.current_round, number)
            job.updated_at = utcnow()
            self._event(s, job_id, "round", {"number": number, "metrics": metrics, "adapter_sha256": adapter_sha256})
            return row

    def list_rounds(self, job_id: str) -> list[RoundRow]:
        return self._list(select(RoundRow).where(RoundRow.job_id == job_id).order_by(RoundRow.number), None)

    def last_round(self, job_id: str) -> RoundRow | None:
        rounds = self.list_rounds(job_id)
        return rounds[-1] if rounds else None

    def add_job_event(self, job_id: str, kind: str, data: dict) -> JobEventRow:
        with self.session() as s:
            return self._event(s, job_id, kind, data)

    def job_events(self, job_id: str, after_seq: int = 0) -> list[JobEventRow]:
        stmt = (
            select(JobEventRow)
            .where(JobEventRow.job_id == job_id, JobEventRow.seq > after_seq)
            .order_by(JobEventRow.seq)
        )
        return self._list(stmt, None)
