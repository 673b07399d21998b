"""The offsite.v1 services: one servicer module per proto service.

Authentication, role checks, error mapping and auditing happen in the interceptor
(:mod:`offsite.server.auth`); servicers raise NotFound / Conflict / ValueError /
PermissionError with a message a person can act on. Data-owner scoping (which jobs and
artifacts a data owner may see) is checked in the servicers because it depends on the
request. Business logic lives beside them: the gate in :mod:`offsite.server.gate`, the job
state machine in :mod:`offsite.server.job_control`, the job-option schema in
:mod:`offsite.server.job_options`.
"""

from __future__ import annotations

from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    artifacts_pb2,
    artifacts_pb2_grpc,
    evals_pb2,
    evals_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    releases_pb2,
    releases_pb2_grpc,
)

from ..gate import start_eval
from ..state import ServerState
from .admin import AdminService, IdentityService
from .artifacts import ArtifactsService
from .evals import EvalsService
from .jobs import JobsService
from .models import EmulatorsService, ModelsService
from .operations import OperationsService
from .releases import ReleasesService

__all__ = [
    "AdminService",
    "ArtifactsService",
    "EmulatorsService",
    "EvalsService",
    "IdentityService",
    "JobsService",
    "ModelsService",
    "OperationsService",
    "ReleasesService",
    "add_services",
    "start_eval",
]


def add_services(server, state: ServerState) -> list[str]:
    """Register every offsite.v1 service; returns their full names (for health and reflection)."""
    pairs = [
        (admin_pb2_grpc.add_IdentityServicer_to_server, IdentityService, admin_pb2, "Identity"),
        (admin_pb2_grpc.add_AdminServicer_to_server, AdminService, admin_pb2, "Admin"),
        (operations_pb2_grpc.add_OperationsServicer_to_server, OperationsService, operations_pb2, "Operations"),
        (artifacts_pb2_grpc.add_ArtifactsServicer_to_server, ArtifactsService, artifacts_pb2, "Artifacts"),
        (models_pb2_grpc.add_ModelsServicer_to_server, ModelsService, models_pb2, "Models"),
        (models_pb2_grpc.add_EmulatorsServicer_to_server, EmulatorsService, models_pb2, "Emulators"),
        (jobs_pb2_grpc.add_JobsServicer_to_server, JobsService, jobs_pb2, "Jobs"),
        (releases_pb2_grpc.add_ReleasesServicer_to_server, ReleasesService, releases_pb2, "Releases"),
        (evals_pb2_grpc.add_EvalsServicer_to_server, EvalsService, evals_pb2, "Evals"),
    ]
    names = []
    for add, cls, module, short in pairs:
        add(cls(state), server)
        names.append(module.DESCRIPTOR.services_by_name[short].full_name)
    return names
