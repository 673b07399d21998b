"""Identity (who am I) and Admin (tokens, audit) servicers."""

from __future__ import annotations

from offsite.protos.v1 import admin_pb2, admin_pb2_grpc

from .. import convert
from ..auth import DATA_OWNER, current_principal
from ..registry import Conflict
from ..state import NAME_RE, ServerState
from .common import limit_of, require


class IdentityService(admin_pb2_grpc.IdentityServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def WhoAmI(self, request, context):
        p = current_principal()
        return admin_pb2.WhoAmIResponse(token_id=p.token_id, name=p.name, role=p.role, jobs=list(p.jobs))


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def CreateToken(self, request, context):
        jobs = list(request.jobs)
        for job_id in jobs:
            self.s.registry.get_job(job_id)
        if jobs and request.role != DATA_OWNER:
            raise ValueError("only data-owner tokens are scoped to jobs; drop --job or use --role data-owner")
        if request.role == DATA_OWNER and not NAME_RE.match(request.name or ""):
            raise ValueError("a data-owner token's name is the data owner's identity: 1-64 letters, digits, . _ -")
        secret, row = self.s.auth.create_token(request.name, request.role, jobs, int(request.ttl_seconds))
        return admin_pb2.CreateTokenResponse(token=convert.token(row), secret=secret)

    async def ListTokens(self, request, context):
        rows = self.s.registry.list_tokens(include_revoked=request.include_revoked)
        return admin_pb2.ListTokensResponse(tokens=[convert.token(r) for r in rows])

    async def RevokeToken(self, request, context):
        require(request.id, "id")
        if request.id == current_principal().token_id:
            raise Conflict("refusing to revoke the token this call is made with; revoke it from another admin token")
        return convert.token(self.s.auth.revoke(request.id))

    async def RotateToken(self, request, context):
        require(request.id, "id")
        if request.id == current_principal().token_id:
            raise Conflict(
                "refusing to rotate the token this call is made with; rotate it from another admin token "
                "(or `offsite-admin tokens rotate-admin` on the server for admin.token)"
            )
        secret, row = self.s.auth.rotate(request.id, int(request.ttl_seconds))
        return admin_pb2.CreateTokenResponse(token=convert.token(row), secret=secret)

    async def ListAudit(self, request, context):
        if len(request.method) > 128:
            raise ValueError("the method filter is longer than 128 characters; use part of a method name, e.g. Release")
        rows = self.s.registry.list_audit(limit=limit_of(request.limit), method=request.method or None)
        return admin_pb2.ListAuditResponse(entries=[convert.audit(r) for r in rows])
