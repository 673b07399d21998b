"""The Releases servicer: list, approve (admins; the gate decides), reject, export, merge (release_merge.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from offsite.protos.v1 import releases_pb2, releases_pb2_grpc

from .. import convert
from ..auth import current_principal
from ..gate import earlier_blocks
from ..hooks import load_hook
from ..operations import OperationContext, OperationResult
from ..registry import RELEASE_STATUSES, Conflict
from ..state import ServerState
from .common import limit_of, require


class ReleasesService(releases_pb2_grpc.ReleasesServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def ListReleases(self, request, context):
        if request.status and request.status not in RELEASE_STATUSES:
            raise ValueError(f"status {request.status!r} is not one of {', '.join(RELEASE_STATUSES)}")
        rows = self.s.registry.list_releases(
            status=request.status or None, job_id=request.job_id or None, limit=limit_of(request.limit)
        )
        return releases_pb2.ListReleasesResponse(releases=[convert.release(self.s.registry, r) for r in rows])

    async def GetRelease(self, request, context):
        return convert.release(self.s.registry, self.s.registry.get_release(require(request.id, "id")))

    async def ApproveRelease(self, request, context):
        rel = self.s.registry.get_release(require(request.id, "id"))
        reason = request.override_reason.strip()
        if rel.gate_verdict != "pass" and not reason:
            what = "blocked it" if rel.gate_verdict == "block" else "has not evaluated it"
            raise Conflict(
                f"the safety gate {what}; run `offsite-admin evals run --candidate {rel.id}` or approve "
                "with --override-reason (audited)"
            )
        notes = [f"override: {reason}"] if reason else []
        blocks = earlier_blocks(self.s.registry, rel) if rel.gate_verdict == "pass" else []
        if blocks:
            notes.append(f"the gate passed in {rel.gate_report_id} after an earlier block ({', '.join(blocks)})")
        row = self.s.registry.update_release(
            rel.id,
            expect_status=("pending-gate", "blocked"),
            status="approved",
            decided_by=current_principal().name,
            reason="; ".join(notes),
        )
        return convert.release(self.s.registry, row)

    async def RejectRelease(self, request, context):
        reason = require(request.reason.strip(), "reason")
        row = self.s.registry.update_release(
            require(request.id, "id"),
            expect_status=("pending-gate", "blocked", "approved"),
            status="rejected",
            decided_by=current_principal().name,
            reason=reason,
        )
        return convert.release(self.s.registry, row)

    async def ExportRelease(self, request, context):
        rel = self.s.registry.get_release(require(request.id, "id"))
        if rel.status not in ("approved", "released"):
            raise Conflict(f"release {rel.id} is {rel.status!r}; only approved releases are exported")
        if not rel.adapter_sha256:
            raise Conflict(f"release {rel.id} has no adapter artifact")
        exporter = load_hook(self.s.config.release_exporter)
        model = self.s.registry.get_model(rel.model_id)
        s = self.s

        def work(ctx: OperationContext) -> OperationResult:
            tmp = Path(tempfile.mkdtemp(prefix=f"export-{ctx.op_id}-", dir=s.work_dir))
            try:
                ctx.progress(0.05, f"plugging the adapter into {model.name}")
                exporter(s.resolve_model_source(model.source), s.store.path(rel.adapter_sha256), tmp / "model")
                ctx.progress(0.8, "storing the model directory")
                sha = s.store.put_dir_as_tar(tmp / "model")
                s.registry.add_artifact(sha, s.store.size(sha), "model-export", f"{rel.id}-model.tar")
                s.registry.update_release(
                    rel.id, expect_status=("approved", "released"), status="released", export_sha256=sha
                )
                return OperationResult(
                    resource=f"releases/{rel.id}", result={"release_id": rel.id, "export_sha256": sha}
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return convert.operation(s.ops.start("release-export", work, created_by=current_principal().name))

    async def MergeReleases(self, request, context):
        from ..release_merge import audit_ungated, config_from_request, merge_work, plan_merge

        who = current_principal()
        plan = plan_merge(
            self.s.registry,
            list(request.release_ids),
            config_from_request(request),
            allow_ungated=request.allow_ungated,
            is_admin=who.role == "admin",
        )
        if plan.ungated:
            audit_ungated(self.s.registry, who, plan)
        return convert.operation(self.s.ops.start("release-merge", merge_work(self.s, plan), created_by=who.name))
