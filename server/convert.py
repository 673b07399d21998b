"""Registry rows to offsite.v1 messages (and back for enums)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from offsite.protos.v1 import (
    admin_pb2,
    common_pb2,
    evals_pb2,
    jobs_pb2,
    models_pb2,
    operations_pb2,
    releases_pb2,
)

from . import registry as r

OP_STATE = {
    "pending": operations_pb2.OPERATION_STATE_PENDING,
    "running": operations_pb2.OPERATION_STATE_RUNNING,
    "succeeded": operations_pb2.OPERATION_STATE_SUCCEEDED,
    "failed": operations_pb2.OPERATION_STATE_FAILED,
    "cancelled": operations_pb2.OPERATION_STATE_CANCELLED,
}
JOB_STATE = {
    "created": jobs_pb2.JOB_STATE_CREATED,
    "running": jobs_pb2.JOB_STATE_RUNNING,
    "completed": jobs_pb2.JOB_STATE_COMPLETED,
    "failed": jobs_pb2.JOB_STATE_FAILED,
    "cancelled": jobs_pb2.JOB_STATE_CANCELLED,
}
JOB_STATE_NAME = {v: k for k, v in JOB_STATE.items()}


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value)
    return out


def struct(data: Any) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if data:
        out.update(json.loads(json.dumps(data, default=str)))
    return out


def from_struct(value: struct_pb2.Struct) -> dict:
    """A Struct as a dict; whole numbers come back as ints (Struct keeps every number as a
    double, and `steps: 20.0` must not reach code that does `range(steps)`)."""
    from google.protobuf.json_format import MessageToDict

    return _whole_numbers_as_int(MessageToDict(value)) if value is not None else {}


def _whole_numbers_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(v) for v in value]
    return value


def artifact_ref(reg: r.Registry, sha: str, kind: str = "") -> common_pb2.ArtifactRef | None:
    if not sha:
        return None
    row = reg.find_artifact(sha)
    if row is None:
        return common_pb2.ArtifactRef(sha256=sha, kind=kind)
    return common_pb2.ArtifactRef(sha256=row.sha256, size=row.size, kind=row.kind, name=row.name)


def model(row: r.ModelRow) -> models_pb2.Model:
    return models_pb2.Model(
        id=row.id,
        name=row.name,
        source=row.source,
        family=row.family,
        digest=row.digest,
        num_layers=row.num_layers,
        description=row.description,
        created_at=ts(row.created_at),
    )


def build_config(cfg: dict) -> models_pb2.EmulatorBuildConfig:
    out = models_pb2.EmulatorBuildConfig()
    for key, value in cfg.items():
        if value is None or not hasattr(out, key):
            continue
        field = getattr(out, key)
        if hasattr(field, "extend"):
            field.extend(value)
        else:
            setattr(out, key, value)
    return out


def emulator(reg: r.Registry, row: r.EmulatorRow) -> models_pb2.Emulator:
    return models_pb2.Emulator(
        id=row.id,
        model_id=row.model_id,
        bundle=artifact_ref(reg, row.bundle_sha256, "bundle"),
        config=build_config(row.config or {}),
        manifest=struct(row.manifest),
        operation_id=row.operation_id,
        created_at=ts(row.created_at),
    )


def operation(row: r.OperationRow) -> operations_pb2.Operation:
    return operations_pb2.Operation(
        id=row.id,
        kind=row.kind,
        state=OP_STATE.get(row.state, 0),
        progress=row.progress,
        message=row.message,
        error=row.error,
        resource=row.resource,
        result=struct(row.result),
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
        created_by=row.created_by,
        done=row.state in ("succeeded", "failed", "cancelled"),
    )


def job_spec(spec: dict) -> jobs_pb2.JobSpec:
    return jobs_pb2.JobSpec(
        emulator_id=spec.get("emulator_id", ""),
        rounds=spec.get("rounds", 0),
        min_clients=spec.get("min_clients", 0),
        fraction=spec.get("fraction", 0.0),
        engine=spec.get("engine", ""),
        train_config=struct(spec.get("train_config")),
        options=struct(spec.get("options")),
    )


def job(row: r.JobRow, data_owners: list[str] | None) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=row.id,
        name=row.name,
        model_id=row.model_id,
        state=JOB_STATE.get(row.state, 0),
        spec=job_spec(row.spec or {}),
        current_round=row.current_round,
        data_owners=data_owners or [],
        release_id=row.release_id,
        federation_address=row.federation_address,
        error=row.error,
        operation_id=row.operation_id,
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
    )


def round_(reg: r.Registry, row: r.RoundRow) -> jobs_pb2.Round:
    return jobs_pb2.Round(
        job_id=row.job_id,
        number=row.number,
        metrics=struct(row.metrics),
        adapter=artifact_ref(reg, row.adapter_sha256, "adapter"),
        created_at=ts(row.created_at),
    )


def job_event(row: r.JobEventRow) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(job_id=row.job_id, seq=row.seq, kind=row.kind, data=struct(row.data), at=ts(row.at))


def release(reg: r.Registry, row: r.ReleaseRow) -> releases_pb2.Release:
    return releases_pb2.Release(
        id=row.id,
        job_id=row.job_id,
        model_id=row.model_id,
        status=row.status,
        adapter=artifact_ref(reg, row.adapter_sha256, "adapter"),
        export=artifact_ref(reg, row.export_sha256, "model-export"),
        metrics=struct(row.metrics),
        gate_report_id=row.gate_report_id,
        gate_verdict=row.gate_verdict,
        decided_by=row.decided_by,
        reason=row.reason,
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
        parent_ids=row.parent_ids or [],
    )


def eval_report(reg: r.Registry, row: r.EvalReportRow) -> evals_pb2.EvalReport:
    return evals_pb2.EvalReport(
        id=row.id,
        candidate=row.candidate,
        base=row.base,
        release_id=row.release_id,
        verdict=row.verdict,
        categories=[
            evals_pb2.CategoryResult(name=str(c.get("name", "")), level=str(c.get("level", "")))
            for c in row.categories or []
        ],
        report_json=artifact_ref(reg, row.report_json_sha256, "eval-report"),
        report_html=artifact_ref(reg, row.report_html_sha256, "eval-report"),
        summary=struct(row.summary),
        schedule_id=row.schedule_id,
        operation_id=row.operation_id,
        created_at=ts(row.created_at),
    )


def eval_schedule(row: r.EvalScheduleRow) -> evals_pb2.EvalSchedule:
    return evals_pb2.EvalSchedule(
        id=row.id,
        name=row.name,
        cron=row.cron,
        candidate=row.candidate,
        base=row.base,
        suites=row.suites or [],
        limit=row.limit,
        enabled=row.enabled,
        next_run_at=ts(row.next_run_at),
        last_run_at=ts(row.last_run_at),
        last_report_id=row.last_report_id,
        created_at=ts(row.created_at),
    )


def token(row: r.TokenRow) -> admin_pb2.Token:
    return admin_pb2.Token(
        id=row.id,
        name=row.name,
        role=row.role,
        jobs=row.jobs or [],
        created_at=ts(row.created_at),
        expires_at=ts(row.expires_at),
        revoked_at=ts(row.revoked_at),
    )


def audit(row: r.AuditRow) -> admin_pb2.AuditEntry:
    return admin_pb2.AuditEntry(
        id=row.id,
        at=ts(row.at),
        actor=row.actor,
        role=row.role,
        method=row.method,
        target=row.target,
        outcome=row.outcome,
        detail=row.detail,
    )
