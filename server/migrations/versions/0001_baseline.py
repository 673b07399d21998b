"""baseline: the registry schema when Alembic took over (schema_meta version 1)

Databases made before Alembic have these tables, perhaps without some columns, and no
alembic_version: offsite.server.migrations.upgrade adds the missing BASELINE_COLUMNS the
way the registry used to (nullable, with the model's default), stamps this revision, and
upgrades from here.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The columns of each table at this revision (frozen: later revisions add their own).
BASELINE_COLUMNS: dict[str, tuple[str, ...]] = {
    "artifacts": ("sha256", "size", "kind", "name", "created_at"),
    "audit": ("id", "at", "actor", "role", "method", "target", "outcome", "detail"),
    "emulators": ("id", "model_id", "bundle_sha256", "config", "manifest", "operation_id", "created_at"),
    "enrollments": ("id", "job_id", "data_owner", "token_id", "created_at", "ended_at"),
    "eval_reports": (
        "id",
        "candidate",
        "base",
        "release_id",
        "verdict",
        "categories",
        "report_json_sha256",
        "report_html_sha256",
        "summary",
        "schedule_id",
        "operation_id",
        "created_at",
    ),
    "eval_schedules": (
        "id",
        "name",
        "cron",
        "candidate",
        "base",
        "suites",
        "limit",
        "enabled",
        "next_run_at",
        "last_run_at",
        "last_report_id",
        "created_at",
    ),
    "job_events": ("id", "job_id", "seq", "kind", "data", "at"),
    "jobs": (
        "id",
        "name",
        "model_id",
        "emulator_id",
        "state",
        "spec",
        "current_round",
        "release_id",
        "federation_address",
        "error",
        "operation_id",
        "created_by",
        "created_at",
        "updated_at",
    ),
    "models": ("id", "name", "source", "family", "digest", "num_layers", "description", "created_at"),
    "operations": (
        "id",
        "kind",
        "state",
        "progress",
        "message",
        "error",
        "resource",
        "result",
        "created_by",
        "created_at",
        "updated_at",
    ),
    "releases": (
        "id",
        "job_id",
        "model_id",
        "status",
        "adapter_sha256",
        "export_sha256",
        "metrics",
        "gate_report_id",
        "gate_verdict",
        "decided_by",
        "reason",
        "created_at",
        "updated_at",
    ),
    "rounds": ("id", "job_id", "number", "metrics", "adapter_sha256", "created_at"),
    "schema_meta": ("key", "value"),
    "tokens": ("id", "name", "role", "secret_hash", "jobs", "created_at", "expires_at", "revoked_at"),
}


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("method", sa.String(length=128), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_audit_at"), "audit", ["at"], unique=False)
    op.create_table(
        "emulators",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("operation_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_emulators_model_id"), "emulators", ["model_id"], unique=False)
    op.create_table(
        "enrollments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("data_owner", sa.String(length=128), nullable=False),
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "data_owner"),
    )
    op.create_index(op.f("ix_enrollments_data_owner"), "enrollments", ["data_owner"], unique=False)
    op.create_index(op.f("ix_enrollments_job_id"), "enrollments", ["job_id"], unique=False)
    op.create_index(op.f("ix_enrollments_token_id"), "enrollments", ["token_id"], unique=False)
    op.create_table(
        "eval_reports",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("candidate", sa.String(length=256), nullable=False),
        sa.Column("base", sa.String(length=256), nullable=False),
        sa.Column("release_id", sa.String(length=32), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("report_json_sha256", sa.String(length=64), nullable=False),
        sa.Column("report_html_sha256", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("schedule_id", sa.String(length=32), nullable=False),
        sa.Column("operation_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_eval_reports_release_id"), "eval_reports", ["release_id"], unique=False)
    op.create_index(op.f("ix_eval_reports_schedule_id"), "eval_reports", ["schedule_id"], unique=False)
    op.create_table(
        "eval_schedules",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("candidate", sa.String(length=256), nullable=False),
        sa.Column("base", sa.String(length=256), nullable=False),
        sa.Column("suites", sa.JSON(), nullable=False),
        sa.Column("limit", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", sa.DateTime(), nullable=True),
        sa.Column("last_run_at", sa.DateTime(), nullable=True),
        sa.Column("last_report_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "seq"),
    )
    op.create_index(op.f("ix_job_events_job_id"), "job_events", ["job_id"], unique=False)
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("emulator_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.String(length=32), nullable=False),
        sa.Column("federation_address", sa.String(length=256), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("operation_id", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "operations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("resource", sa.String(length=128), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "releases",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("adapter_sha256", sa.String(length=64), nullable=False),
        sa.Column("export_sha256", sa.String(length=64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("gate_report_id", sa.String(length=32), nullable=False),
        sa.Column("gate_verdict", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_releases_job_id"), "releases", ["job_id"], unique=False)
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("adapter_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "number"),
    )
    op.create_index(op.f("ix_rounds_job_id"), "rounds", ["job_id"], unique=False)
    op.create_table(
        "schema_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("jobs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_hash"),
    )
    op.bulk_insert(
        sa.table("schema_meta", sa.column("key", sa.String), sa.column("value", sa.String)),
        [{"key": "version", "value": "1"}],
    )


def downgrade() -> None:
    for table in reversed(list(BASELINE_COLUMNS)):
        op.drop_table(table)
