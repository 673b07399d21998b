"""API tokens (roles, expiry, revocation) and the audit log of every call made with one."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select

from .errors import Conflict, NotFound
from .store import Store
from .tables import ROLES, AuditRow, EnrollmentRow, TokenRow, new_id, utcnow


class Tokens(Store):
    """Tokens and audit."""

    # ---- tokens and audit -------------------------------------------------------------------
    def add_token(
        self, name: str, role: str, secret_hash: str, jobs: list[str] | None = None, expires_at: datetime | None = None
    ) -> TokenRow:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        row = TokenRow(
            id=new_id("tok"), name=name, role=role, secret_hash=secret_hash, jobs=jobs or [], expires_at=expires_at
        )
        with self.session() as s:
            s.add(row)
        return row

    def token_by_hash(self, secret_hash: str) -> TokenRow | None:
        with self.session() as s:
            return s.scalar(select(TokenRow).where(TokenRow.secret_hash == secret_hash))

    def get_token(self, token_id: str) -> TokenRow:
        return self._get(TokenRow, token_id, "token")

    def list_tokens(self, include_revoked: bool = False) -> list[TokenRow]:
        stmt = select(TokenRow).order_by(TokenRow.created_at)
        if not include_revoked:
            stmt = stmt.where(TokenRow.revoked_at.is_(None))
        return self._list(stmt, None)

    def revoke_token(self, token_id: str) -> TokenRow:
        with self.session() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                raise NotFound(f"no token with id {token_id!r}; `offsite-admin tokens list` shows the ids")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            # Revocation ends the token's enrollments: its data owner leaves those jobs.
            for e in s.scalars(
                select(EnrollmentRow).where(EnrollmentRow.token_id == token_id, EnrollmentRow.ended_at.is_(None))
            ):
                e.ended_at = row.revoked_at
                self._event(s, e.job_id, "unenrolled", {"data_owner": e.data_owner, "reason": "token revoked"})
            return row

    def rotate_token(self, token_id: str, secret_hash: str, expires_at: datetime | None) -> TokenRow:
        """In one transaction: a new token with the old one's name, role and jobs, its live
        enrollments moved over (the data owner stays in its jobs), the old one revoked."""
        with self.session() as s:
            old = s.get(TokenRow, token_id, with_for_update=True)  # two rotations: one wins
            if old is None:
                raise NotFound(f"no token with id {token_id!r}; `offsite-admin tokens list` shows the ids")
            if old.revoked_at is not None:
                raise Conflict(f"token {token_id} is revoked; create a new one with `offsite-admin tokens create`")
            new = TokenRow(
                id=new_id("tok"),
                name=old.name,
                role=old.role,
                secret_hash=secret_hash,
                jobs=list(old.jobs or []),
                expires_at=expires_at,
            )
            s.add(new)
            s.flush()
            for e in s.scalars(
                select(EnrollmentRow).where(EnrollmentRow.token_id == token_id, EnrollmentRow.ended_at.is_(None))
            ):
                e.token_id = new.id
            old.revoked_at = utcnow()
            return new

    def count_tokens(self, role: str | None = None) -> int:
        with self.session() as s:
            stmt = select(func.count()).select_from(TokenRow)
            if role:
                stmt = stmt.where(TokenRow.role == role)
            return int(s.scalar(stmt))

    def audit(
        self, actor: str, role: str, method: str, target: str = "", outcome: str = "ok", detail: str = ""
    ) -> None:
        with self.session() as s:
            s.add(AuditRow(actor=actor, role=role, method=method, target=target[:256], outcome=outcome, detail=detail))

    def list_audit(self, limit: int = 100, method: str | None = None) -> list[AuditRow]:
        stmt = select(AuditRow).order_by(AuditRow.id.desc())
        if method:
            stmt = stmt.where(AuditRow.method.contains(method))
        return self._list(stmt, limit)
