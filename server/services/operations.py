"""The Operations servicer: long work (builds, evals, jobs, exports) polled, watched, cancelled."""

from __future__ import annotations

from offsite.protos.v1 import operations_pb2, operations_pb2_grpc

from .. import convert
from ..state import ServerState
from .common import limit_of, require


class OperationsService(operations_pb2_grpc.OperationsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def GetOperation(self, request, context):
        return convert.operation(self.s.registry.get_operation(require(request.id, "id")))

    async def ListOperations(self, request, context):
        rows = self.s.registry.list_operations(kind=request.kind or None, limit=limit_of(request.limit))
        return operations_pb2.ListOperationsResponse(operations=[convert.operation(r) for r in rows])

    async def WatchOperation(self, request, context):
        async for row in self.s.ops.watch(require(request.id, "id")):
            yield convert.operation(row)

    async def CancelOperation(self, request, context):
        return convert.operation(self.s.ops.cancel(require(request.id, "id")))
