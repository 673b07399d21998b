"""The Jobs servicer: the gRPC side of jobs (validation, scope, messages).

The job's state machine (claim, run, end, cancel) is :mod:`offsite.server.job_control`.
"""

from __future__ import annotations

import asyncio

from offsite.protos.v1 import jobs_pb2, jobs_pb2_grpc

from .. import convert
from ..auth import ADMIN, Principal, current_principal
from ..errors import TooManyStreams
from ..job_control import cancel_job, start_job
from ..job_options import validate_spec
from ..registry import Conflict
from ..state import NAME_RE, ServerState
from .common import DONE_JOB_STATES, check_job_visible, limit_of, require, visible_jobs


class JobsService(jobs_pb2_grpc.JobsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state
        self._watching: dict[str, int] = {}  # open WatchJob streams per data-owner token

    def _job_message(self, row) -> jobs_pb2.Job:
        # Data owners do not learn who else is enrolled.
        owners = self.s.registry.enrolled_data_owners(row.id) if current_principal().is_staff else None
        return convert.job(row, owners)

    async def CreateJob(self, request, context):
        spec = request.spec
        emulator = self.s.registry.get_emulator(require(spec.emulator_id, "spec.emulator_id"))
        if request.name and not NAME_RE.match(request.name):
            raise ValueError(f"job name {request.name!r}: 1-64 letters, digits, . _ -")
        spec_dict = validate_spec(
            emulator_id=emulator.id,
            rounds=spec.rounds,
            min_clients=spec.min_clients,
            fraction=spec.fraction,
            engine=spec.engine,
            train_config=convert.from_struct(spec.train_config),
            options=convert.from_struct(spec.options),
            policy=self.s.config.job_policy,
        )
        row = self.s.registry.add_job(
            request.name or f"job-{emulator.id}",
            emulator.model_id,
            emulator.id,
            spec_dict,
            created_by=current_principal().name,
            federation_address=self.s.config.federation_address,
        )
        return self._job_message(row)

    async def GetJob(self, request, context):
        check_job_visible(self.s, require(request.id, "id"))
        return self._job_message(self.s.registry.get_job(request.id))

    async def ListJobs(self, request, context):
        state = convert.JOB_STATE_NAME.get(request.state) if request.state else None
        rows = self.s.registry.list_jobs(
            state=state, job_ids=visible_jobs(self.s, current_principal()), limit=limit_of(request.limit)
        )
        return jobs_pb2.ListJobsResponse(jobs=[self._job_message(r) for r in rows])

    async def ListRounds(self, request, context):
        check_job_visible(self.s, require(request.job_id, "job_id"))
        rows = self.s.registry.list_rounds(request.job_id)
        return jobs_pb2.ListRoundsResponse(rounds=[convert.round_(self.s.registry, r) for r in rows])

    async def WatchJob(self, request, context):
        job_id = require(request.id, "id")
        check_job_visible(self.s, job_id)
        me = current_principal()
        if not me.is_staff:
            # Each open stream polls the registry; a data owner needs one or two, not hundreds.
            limit = self.s.config.max_watch_streams_per_data_owner
            if self._watching.get(me.token_id, 0) >= limit:
                raise TooManyStreams(f"this token already has {limit} WatchJob streams open; close one first")
            self._watching[me.token_id] = self._watching.get(me.token_id, 0) + 1
        try:
            async for ev in self._job_events(job_id, request.after_seq, request.follow, me):
                yield ev
        finally:
            if not me.is_staff:
                left = self._watching.get(me.token_id, 1) - 1
                if left > 0:
                    self._watching[me.token_id] = left
                else:
                    self._watching.pop(me.token_id, None)

    async def _job_events(self, job_id: str, after: int, follow: bool, me: Principal):
        while True:
            events = self.s.registry.job_events(job_id, after)
            for ev in events:
                after = ev.seq
                if (
                    not me.is_staff
                    and ev.kind in ("enrolled", "unenrolled")
                    and (ev.data or {}).get("data_owner") != me.name
                ):
                    continue  # data owners do not learn who else is enrolled
                yield convert.job_event(ev)
            if not follow:
                return
            if not events and self.s.registry.get_job(job_id).state in DONE_JOB_STATES:
                # Done and drained (a last check catches events written just before the state change).
                if not self.s.registry.job_events(job_id, after):
                    return
            await asyncio.sleep(0.5)

    async def Enroll(self, request, context):
        p = current_principal()
        job = self.s.registry.get_job(require(request.job_id, "job_id"))
        if p.role == ADMIN:
            owner = request.data_owner
            if not NAME_RE.match(owner or ""):
                raise ValueError("admins enroll on someone's behalf: set data_owner (1-64 letters, digits, . _ -)")
        else:
            if request.data_owner and request.data_owner != p.name:
                raise PermissionError(
                    f"this token belongs to data owner {p.name!r}; it cannot enroll {request.data_owner!r}"
                )
            if job.id not in p.jobs:
                raise PermissionError(
                    f"this token does not name job {job.id}; ask the model owner for a token "
                    f"created with --job {job.id}"
                )
            owner = p.name
        if job.state in DONE_JOB_STATES:
            raise Conflict(f"job {job.id} is {job.state}; it takes no more data owners")
        emulator = self.s.registry.get_emulator(job.emulator_id)
        try:  # the key that signed THIS bundle: after a key rotation, older bundles keep their key
            public_key = self.s.public_key_for(emulator.manifest).read_bytes()
        except ValueError as e:
            raise Conflict(f"job {job.id}: {e}") from None
        # An admin's enrollment on someone's behalf belongs to no token (revoking the admin's token
        # must not unenroll them); the data owner's own token takes it over when it enrolls.
        self.s.registry.enroll(job.id, owner, "" if p.role == ADMIN else p.token_id)
        spec = job.spec or {}
        base = emulator.manifest.get("base_model") if isinstance(emulator.manifest, dict) else None
        digest = (base or {}).get("digest", "") if isinstance(base, dict) else ""
        if not digest:
            digest = self.s.registry.get_model(job.model_id).digest
        return jobs_pb2.EnrollResponse(
            job_id=job.id,
            data_owner=owner,
            bundle=convert.artifact_ref(self.s.registry, emulator.bundle_sha256, "bundle"),
            bundle_public_key=public_key,
            federation_address=job.federation_address,
            train_config=convert.struct(spec.get("train_config")),
            emulator_id=emulator.id,
            base_model_digest=digest,
            federation=convert.struct(
                {
                    "engine": spec.get("engine", ""),
                    "rounds": spec.get("rounds", 0),
                    "min_clients": spec.get("min_clients", 0),
                    **(spec.get("options") or {}),
                }
            ),
        )

    async def StartJob(self, request, context):
        row = start_job(self.s, require(request.id, "id"), created_by=current_principal().name)
        return convert.operation(row)

    async def CancelJob(self, request, context):
        return self._job_message(await cancel_job(self.s, require(request.id, "id")))
