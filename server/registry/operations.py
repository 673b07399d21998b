"""Long-running operations (emulator builds, evals, ...) that clients poll."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from .errors import NotFound
from .store import Store
from .tables import OperationRow, new_id, utcnow


class Operations(Store):
    """Operations."""

    # ---- operations -------------------------------------------------------------------------
    def add_operation(self, kind: str, created_by: str = "") -> OperationRow:
        row = OperationRow(id=new_id("op"), kind=kind, created_by=created_by)
        with self.session() as s:
            s.add(row)
        return row

    def update_operation(self, op_id: str, **fields: Any) -> OperationRow:
        with self.session() as s:
            row = s.get(OperationRow, op_id)
            if row is None:
                raise NotFound(f"no operation with id {op_id!r}")
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = utcnow()
            return row

    def get_operation(self, op_id: str) -> OperationRow:
        return self._get(OperationRow, op_id, "operation")

    def list_operations(
        self, kind: str | None = None, states: tuple[str, ...] | None = None, limit: int | None = None
    ) -> list[OperationRow]:
        stmt = select(OperationRow).order_by(OperationRow.created_at.desc())
        if kind:
            stmt = stmt.where(OperationRow.kind == kind)
        if states:
            stmt = stmt.where(OperationRow.state.in_(states))
        return self._list(stmt, limit)
