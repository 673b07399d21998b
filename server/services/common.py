"""What every offsite.v1 servicer shares: request limits, required fields, data-owner scope."""

from __future__ import annotations

from ..auth import Principal, current_principal
from ..registry import NotFound
from ..state import NAME_RE, ServerState

MAX_LIMIT = 1000
DONE_JOB_STATES = ("completed", "failed", "cancelled")


def limit_of(value: int) -> int:
    if value < 0:
        raise ValueError("limit must be >= 0 (0 = server default)")
    return min(value or 100, MAX_LIMIT)


def require(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} is required")
    if len(value) > 256:
        raise ValueError(f"{what} is longer than 256 characters")
    return value


def visible_jobs(state: ServerState, p: Principal) -> list[str] | None:
    """None for staff (all jobs); for a data owner, the jobs its token names and is enrolled in
    (by token id: a name is not an identity, and another token with the same name sees nothing)."""
    if p.is_staff:
        return None
    return [j for j in state.registry.jobs_of_token(p.token_id) if j in p.jobs]


def check_job_visible(state: ServerState, job_id: str) -> None:
    p = current_principal()
    visible = visible_jobs(state, p)
    if visible is not None and job_id not in visible:
        raise NotFound(
            f"no job {job_id!r} among the jobs data owner {p.name!r} is enrolled in; "
            "enroll first (offsite-client enroll --job ...)"
        )


def suite_names(suites) -> list[str]:
    names = list(suites)
    for name in names:
        if not NAME_RE.match(name):
            raise ValueError(
                f"suite {name!r}: suite names are 1-64 letters, digits, . _ - (see `offsite-admin eval suites`)"
            )
    return names
