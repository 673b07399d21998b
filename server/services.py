"""The offsite.v1 services.

Authentication, role checks, error mapping and auditing happen in the interceptor
(:mod:`offsite.server.auth`); services raise NotFound / Conflict / ValueError /
PermissionError with a message a person can act on. Data-owner scoping (which jobs and
artifacts a data owner may see) is checked here because it depends on the request.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from offsite.files import extract_tar
from offsite.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
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

from . import convert
from .artifacts import BlobWriter, check_sha256
from .auth import ADMIN, DATA_OWNER, Principal, TooManyStreams, current_principal
from .hooks import JobRunContext, load_hook
from .job_options import validate_spec
from .operations import OperationCancelled, OperationContext, OperationResult
from .registry import RELEASE_STATUSES, Conflict, NotFound, utcnow
from .state import NAME_RE, ServerState

MAX_LIMIT = 1000
_MIN_CHUNK, _MAX_CHUNK = 4096, 4 * 1024 * 1024
_QUANT = ("none", "int8", "int4", "int3", "int2")
_DONE_JOB_STATES = ("completed", "failed", "cancelled")


def _limit(value: int) -> int:
    if value < 0:
        raise ValueError("limit must be >= 0 (0 = server default)")
    return min(value or 100, MAX_LIMIT)


def _require(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} is required")
    if len(value) > 256:
        raise ValueError(f"{what} is longer than 256 characters")
    return value


def _visible_jobs(state: ServerState, p: Principal) -> list[str] | None:
    """None for staff (all jobs); for a data owner, the jobs its token names and is enrolled in
    (by token id: a name is not an identity, and another token with the same name sees nothing)."""
    if p.is_staff:
        return None
    return [j for j in state.registry.jobs_of_token(p.token_id) if j in p.jobs]


def _check_job_visible(state: ServerState, job_id: str) -> None:
    p = current_principal()
    visible = _visible_jobs(state, p)
    if visible is not None and job_id not in visible:
        raise NotFound(f"no job {job_id!r} among the jobs data owner {p.name!r} is enrolled in; "
                       "enroll first (offsite-client enroll --job ...)")


# ---- identity, admin ------------------------------------------------------------------------
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
        _require(request.id, "id")
        if request.id == current_principal().token_id:
            raise Conflict("refusing to revoke the token this call is made with; revoke it from another admin token")
        return convert.token(self.s.auth.revoke(request.id))

    async def ListAudit(self, request, context):
        if len(request.method) > 128:
            raise ValueError("the method filter is longer than 128 characters; use part of a method name, e.g. Release")
        rows = self.s.registry.list_audit(limit=_limit(request.limit), method=request.method or None)
        return admin_pb2.ListAuditResponse(entries=[convert.audit(r) for r in rows])


# ---- operations -------------------------------------------------------------------------------
class OperationsService(operations_pb2_grpc.OperationsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def GetOperation(self, request, context):
        return convert.operation(self.s.registry.get_operation(_require(request.id, "id")))

    async def ListOperations(self, request, context):
        rows = self.s.registry.list_operations(kind=request.kind or None, limit=_limit(request.limit))
        return operations_pb2.ListOperationsResponse(operations=[convert.operation(r) for r in rows])

    async def WatchOperation(self, request, context):
        async for row in self.s.ops.watch(_require(request.id, "id")):
            yield convert.operation(row)

    async def CancelOperation(self, request, context):
        return convert.operation(self.s.ops.cancel(_require(request.id, "id")))


# ---- artifacts ----------------------------------------------------------------------------------
class ArtifactsService(artifacts_pb2_grpc.ArtifactsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    def _check_visible(self, sha: str) -> None:
        p = current_principal()
        if p.is_staff:
            return
        for job_id in _visible_jobs(self.s, p) or []:
            job = self.s.registry.get_job(job_id)
            if job.emulator_id and self.s.registry.get_emulator(job.emulator_id).bundle_sha256 == sha:
                return
        raise NotFound(f"no artifact {sha} among the bundles of the jobs data owner {p.name!r} is enrolled in")

    async def StatArtifact(self, request, context):
        sha = check_sha256(request.sha256)
        self._check_visible(sha)
        row = self.s.registry.get_artifact(sha)
        return common_pb2.ArtifactRef(sha256=sha, size=self.s.store.size(sha), kind=row.kind, name=row.name)

    async def Download(self, request, context):
        sha = check_sha256(request.sha256)
        self._check_visible(sha)
        size = self.s.store.size(sha)
        offset = request.offset
        if offset < 0 or offset > size:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"offset {offset} is outside the artifact (0..{size} bytes); restart from 0")
        chunk = request.chunk_size or self.s.config.download_chunk_bytes
        if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
            raise ValueError(f"chunk_size {chunk} must be between {_MIN_CHUNK} and {_MAX_CHUNK} bytes (0 = default)")
        if offset == size:
            yield artifacts_pb2.DownloadChunk(offset=offset, data=b"", total_size=size, sha256=sha)
            return
        with self.s.store.open(sha) as fh:
            fh.seek(offset)
            pos = offset
            while True:
                # Page-cache reads of <= 4 MiB take well under a millisecond; not worth a thread hop.
                data = fh.read(chunk)
                if not data:
                    break
                yield artifacts_pb2.DownloadChunk(offset=pos, data=data, total_size=size, sha256=sha)
                pos += len(data)

    async def Upload(self, request_iterator, context):
        writer = BlobWriter(self.s.store, self.s.config.max_upload_bytes)
        kind = name = expected = ""
        first = True
        try:
            async for msg in request_iterator:
                if first:
                    kind, name, expected = msg.kind or "blob", msg.name, msg.expected_sha256
                    if expected:
                        check_sha256(expected)
                    if not NAME_RE.match(kind):
                        raise ValueError(f"artifact kind {kind!r}: use letters, digits, . _ -")
                    first = False
                if msg.data:
                    writer.write(msg.data)
        except BaseException:
            writer.abort()
            raise
        sha = writer.commit(expected or None)
        row = self.s.registry.add_artifact(sha, writer.size, kind, name[:256])
        return common_pb2.ArtifactRef(sha256=sha, size=row.size, kind=row.kind, name=row.name)


# ---- models and emulators -----------------------------------------------------------------------------
class ModelsService(models_pb2_grpc.ModelsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def RegisterModel(self, request, context):
        if not NAME_RE.match(request.name):
            raise ValueError(f"model name {request.name!r}: 1-64 letters, digits, . _ - (starting with a letter or digit)")
        source = self.s.resolve_model_source(request.source or request.name)
        try:
            self.s.registry.get_model(request.name)
            raise Conflict(f"a model named {request.name!r} is already registered; pick another name")
        except NotFound:
            pass
        info = await asyncio.to_thread(_inspect_model, source)
        row = self.s.registry.add_model(request.name, source if request.source else request.name, **info,
                                        description=request.description[:2000])
        return convert.model(row)

    async def GetModel(self, request, context):
        return convert.model(self.s.registry.get_model(_require(request.id, "id")))

    async def ListModels(self, request, context):
        return models_pb2.ListModelsResponse(models=[convert.model(r) for r in
                                                     self.s.registry.list_models(limit=_limit(request.limit))])


def _inspect_model(source: str) -> dict:
    from offsite.emulators.models import load_model

    loaded = load_model(source)
    return {"family": loaded.family.name, "digest": loaded.digest,
            "num_layers": int(loaded.family.num_layers(loaded.model.config))}


def _build_config_dict(cfg: models_pb2.EmulatorBuildConfig) -> dict:
    """Only the fields the caller set, so BuildConfig's defaults apply to the rest."""
    out: dict = {}
    if cfg.adapter_layers:
        if len(cfg.adapter_layers) != 2 or min(cfg.adapter_layers) < 0:
            raise ValueError("adapter_layers needs two non-negative numbers: [bottom, top], e.g. [2, 2]")
        out["adapter_layers"] = tuple(cfg.adapter_layers)
    if cfg.emulator_layers:
        out["emulator_layers"] = cfg.emulator_layers
    if cfg.distill_steps < 0 or cfg.distill_steps > 1_000_000:
        raise ValueError("distill_steps must be between 0 and 1000000")
    if cfg.distill_steps:
        out["distill_steps"] = cfg.distill_steps
    if cfg.quantize:
        if cfg.quantize not in _QUANT:
            raise ValueError(f"quantize {cfg.quantize!r} is not one of {', '.join(_QUANT)}")
        out["quantize"] = cfg.quantize
    if cfg.awq:
        out["awq"] = True
    if cfg.corpus:
        if cfg.corpus != "python-reference":
            raise ValueError("corpus: only 'python-reference' can be named over the API (server-side paths are not accepted)")
        out["corpus"] = cfg.corpus
    if cfg.block_size:
        if not 8 <= cfg.block_size <= 8192:
            raise ValueError("block_size must be between 8 and 8192")
        out["block_size"] = cfg.block_size
    if cfg.seed:
        out["seed"] = cfg.seed
    if cfg.kept:
        out["kept"] = list(cfg.kept)
    return out


class EmulatorsService(models_pb2_grpc.EmulatorsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def BuildEmulator(self, request, context):
        model = self.s.registry.get_model(_require(request.model, "model"))
        cfg = _build_config_dict(request.config)
        builder = load_hook(self.s.config.emulator_builder)
        s = self.s

        def work(ctx: OperationContext) -> OperationResult:
            tmp = Path(tempfile.mkdtemp(prefix=f"build-{ctx.op_id}-", dir=s.work_dir))
            try:
                ctx.progress(0.0, f"building an emulator of {model.name}")
                source = s.resolve_model_source(model.source)
                manifest = builder({**cfg, "model": source}, s.signing_key, tmp / "bundle",
                                   lambda f, m="": ctx.progress(0.95 * float(f), m))
                ctx.progress(0.96, "storing the bundle")
                sha = s.store.put_dir_as_tar(tmp / "bundle")
                s.registry.add_artifact(sha, s.store.size(sha), "bundle", f"{model.name}-emulator.tar")
                emu = s.registry.add_emulator(model.id, sha, _jsonable(cfg), manifest, ctx.op_id)
                return OperationResult(resource=f"emulators/{emu.id}",
                                       result={"emulator_id": emu.id, "bundle_sha256": sha})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        row = s.ops.start("emulator-build", work, created_by=current_principal().name)
        return convert.operation(row)

    async def RegisterEmulator(self, request, context):
        model = self.s.registry.get_model(_require(request.model, "model"))
        sha = check_sha256(request.bundle_sha256)
        path = self.s.store.path(sha)
        if not path.is_file():
            raise NotFound(f"no artifact {sha}; upload the bundle tar first (Artifacts.Upload)")
        from offsite.emulators.bundle import BundleError, verify_bundle

        try:
            manifest = await asyncio.to_thread(verify_bundle, path, self.s.public_key)
        except BundleError as e:
            raise ValueError(f"the uploaded bundle does not verify with this server's signing key: {e}") from None
        base = manifest.get("base_model", {}) if isinstance(manifest.get("base_model"), dict) else {}
        digest = base.get("digest") or manifest.get("base_model_digest") or ""
        if model.digest and digest and digest != model.digest:
            raise ValueError(f"the bundle was built from a model with digest {digest[:12]}..., not {model.name} "
                             f"({model.digest[:12]}...)")
        self.s.registry.add_artifact(sha, self.s.store.size(sha), "bundle", f"{model.name}-emulator.tar")
        row = self.s.registry.add_emulator(model.id, sha, {}, manifest)
        return convert.emulator(self.s.registry, row)

    async def GetEmulator(self, request, context):
        return convert.emulator(self.s.registry, self.s.registry.get_emulator(_require(request.id, "id")))

    async def ListEmulators(self, request, context):
        model_id = self.s.registry.get_model(request.model).id if request.model else None
        rows = self.s.registry.list_emulators(model_id=model_id, limit=_limit(request.limit))
        return models_pb2.ListEmulatorsResponse(emulators=[convert.emulator(self.s.registry, r) for r in rows])


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


# ---- jobs -------------------------------------------------------------------------------------------
def _end_job(state: ServerState, job_id: str, end: str, error: str = "") -> None:
    """Move a running job to `end`; a job already ended (e.g. cancelled by CancelJob) keeps its state."""
    fields = {"state": end, "error": error} if error else {"state": end}
    try:
        state.registry.update_job(job_id, expect_state=("running",), **fields)
    except Conflict:
        pass


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
        emulator = self.s.registry.get_emulator(_require(spec.emulator_id, "spec.emulator_id"))
        if request.name and not NAME_RE.match(request.name):
            raise ValueError(f"job name {request.name!r}: 1-64 letters, digits, . _ -")
        spec_dict = validate_spec(emulator_id=emulator.id, rounds=spec.rounds, min_clients=spec.min_clients,
                                  fraction=spec.fraction, engine=spec.engine,
                                  train_config=convert.from_struct(spec.train_config),
                                  options=convert.from_struct(spec.options), policy=self.s.config.job_policy)
        row = self.s.registry.add_job(request.name or f"job-{emulator.id}", emulator.model_id, emulator.id, spec_dict,
                                      created_by=current_principal().name,
                                      federation_address=self.s.config.federation_address)
        return self._job_message(row)

    async def GetJob(self, request, context):
        _check_job_visible(self.s, _require(request.id, "id"))
        return self._job_message(self.s.registry.get_job(request.id))

    async def ListJobs(self, request, context):
        state = convert.JOB_STATE_NAME.get(request.state) if request.state else None
        rows = self.s.registry.list_jobs(state=state, job_ids=_visible_jobs(self.s, current_principal()),
                                         limit=_limit(request.limit))
        return jobs_pb2.ListJobsResponse(jobs=[self._job_message(r) for r in rows])

    async def ListRounds(self, request, context):
        _check_job_visible(self.s, _require(request.job_id, "job_id"))
        rows = self.s.registry.list_rounds(request.job_id)
        return jobs_pb2.ListRoundsResponse(rounds=[convert.round_(self.s.registry, r) for r in rows])

    async def WatchJob(self, request, context):
        job_id = _require(request.id, "id")
        _check_job_visible(self.s, job_id)
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
                if not me.is_staff and ev.kind in ("enrolled", "unenrolled") and (ev.data or {}).get("data_owner") != me.name:
                    continue  # data owners do not learn who else is enrolled
                yield convert.job_event(ev)
            if not follow:
                return
            if not events and self.s.registry.get_job(job_id).state in _DONE_JOB_STATES:
                # Done and drained (a last check catches events written just before the state change).
                if not self.s.registry.job_events(job_id, after):
                    return
            await asyncio.sleep(0.5)

    async def Enroll(self, request, context):
        p = current_principal()
        job = self.s.registry.get_job(_require(request.job_id, "job_id"))
        if p.role == ADMIN:
            owner = request.data_owner
            if not NAME_RE.match(owner or ""):
                raise ValueError("admins enroll on someone's behalf: set data_owner (1-64 letters, digits, . _ -)")
        else:
            if request.data_owner and request.data_owner != p.name:
                raise PermissionError(f"this token belongs to data owner {p.name!r}; it cannot enroll {request.data_owner!r}")
            if job.id not in p.jobs:
                raise PermissionError(f"this token does not name job {job.id}; ask the model owner for a token "
                                      f"created with --job {job.id}")
            owner = p.name
        if job.state in _DONE_JOB_STATES:
            raise Conflict(f"job {job.id} is {job.state}; it takes no more data owners")
        emulator = self.s.registry.get_emulator(job.emulator_id)
        self.s.registry.enroll(job.id, owner, p.token_id)
        spec = job.spec or {}
        base = emulator.manifest.get("base_model") if isinstance(emulator.manifest, dict) else None
        digest = (base or {}).get("digest", "") if isinstance(base, dict) else ""
        if not digest:
            digest = self.s.registry.get_model(job.model_id).digest
        return jobs_pb2.EnrollResponse(
            job_id=job.id, data_owner=owner, bundle=convert.artifact_ref(self.s.registry, emulator.bundle_sha256, "bundle"),
            bundle_public_key=self.s.public_key.read_bytes(), federation_address=job.federation_address,
            train_config=convert.struct(spec.get("train_config")), emulator_id=emulator.id, base_model_digest=digest,
            federation=convert.struct({"engine": spec.get("engine", ""), "rounds": spec.get("rounds", 0),
                                       "min_clients": spec.get("min_clients", 0), **(spec.get("options") or {})}))

    async def StartJob(self, request, context):
        job = self.s.registry.get_job(_require(request.id, "id"))
        if job.state == "completed":
            raise Conflict(f"job {job.id} has completed; create a new job to train again")
        runner = load_hook(self.s.config.job_runner)
        s = self.s
        emulator = s.registry.get_emulator(job.emulator_id)
        model = s.registry.get_model(job.model_id)
        job_id = job.id
        # Claim the job first (one transaction), so two StartJob calls cannot both run it.
        previous = job.state
        try:
            s.registry.update_job(job_id, expect_state=("created", "failed", "cancelled"), state="running", error="")
        except Conflict:
            raise Conflict(f"job {job_id} is already running (operation {s.registry.get_job(job_id).operation_id})")

        def work(ctx: OperationContext) -> OperationResult:
            job_row = s.registry.get_job(job_id)
            work_dir = s.work_dir / job_id
            work_dir.mkdir(exist_ok=True)
            run_ctx = JobRunContext(job=job_row, emulator=emulator, model=model, registry=s.registry, store=s.store,
                                    op=ctx, data_dir=s.data_dir, bundle_path=s.store.path(emulator.bundle_sha256),
                                    public_key_path=s.public_key, work_dir=work_dir,
                                    data_owners=s.registry.enrolled_data_owners(job_id), policy=s.config.job_policy)
            try:
                runner(run_ctx)
                ctx.check_cancelled()
            except OperationCancelled:
                _end_job(s, job_id, "cancelled")
                raise
            except Exception as e:
                _end_job(s, job_id, "failed", f"{type(e).__name__}: {e}"[:2000])
                raise
            final = s.registry.get_job(job_id)
            if final.state == "running":  # a runner may have recorded its own end state already
                final = s.registry.update_job(job_id, state="completed")
            if final.state in ("failed", "cancelled"):
                raise RuntimeError(f"the job runner ended the job as {final.state}: {final.error}")
            return OperationResult(resource=f"jobs/{job_id}",
                                   result={"job_id": job_id, "release_id": final.release_id,
                                           "rounds": final.current_round})

        try:
            row = s.ops.start("job-run", work, created_by=current_principal().name)
        except BaseException:
            s.registry.update_job(job_id, state=previous)
            raise
        s.registry.update_job(job_id, operation_id=row.id)
        return convert.operation(row)

    async def CancelJob(self, request, context):
        job = self.s.registry.get_job(_require(request.id, "id"))
        if job.state in _DONE_JOB_STATES:
            raise Conflict(f"job {job.id} is already {job.state}")
        if job.state == "running" and job.operation_id:
            # Cancelling the operation also terminates the runner's child processes (flwr, ...).
            self.s.ops.cancel(job.operation_id)
            # The runner thread marks the job cancelled when it stops; wait briefly for that.
            for _ in range(50):
                if self.s.registry.get_job(job.id).state != "running":
                    break
                await asyncio.sleep(0.1)
            # A runner that has not stopped yet cannot keep the job running: its end is recorded now.
            _end_job(self.s, job.id, "cancelled")
        else:
            self.s.registry.update_job(job.id, state="cancelled")
        return self._job_message(self.s.registry.get_job(job.id))


# ---- releases ----------------------------------------------------------------------------------------
class ReleasesService(releases_pb2_grpc.ReleasesServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def ListReleases(self, request, context):
        if request.status and request.status not in RELEASE_STATUSES:
            raise ValueError(f"status {request.status!r} is not one of {', '.join(RELEASE_STATUSES)}")
        rows = self.s.registry.list_releases(status=request.status or None, job_id=request.job_id or None,
                                             limit=_limit(request.limit))
        return releases_pb2.ListReleasesResponse(releases=[convert.release(self.s.registry, r) for r in rows])

    async def GetRelease(self, request, context):
        return convert.release(self.s.registry, self.s.registry.get_release(_require(request.id, "id")))

    async def ApproveRelease(self, request, context):
        rel = self.s.registry.get_release(_require(request.id, "id"))
        reason = request.override_reason.strip()
        if rel.gate_verdict != "pass" and not reason:
            what = "blocked it" if rel.gate_verdict == "block" else "has not evaluated it"
            raise Conflict(f"the safety gate {what}; run `offsite-admin evals run --candidate {rel.id}` or approve "
                           "with --override-reason (audited)")
        notes = [f"override: {reason}"] if reason else []
        blocks = earlier_blocks(self.s.registry, rel) if rel.gate_verdict == "pass" else []
        if blocks:
            notes.append(f"the gate passed in {rel.gate_report_id} after an earlier block ({', '.join(blocks)})")
        row = self.s.registry.update_release(rel.id, expect_status=("pending-gate", "blocked"), status="approved",
                                             decided_by=current_principal().name, reason="; ".join(notes))
        return convert.release(self.s.registry, row)

    async def RejectRelease(self, request, context):
        reason = _require(request.reason.strip(), "reason")
        row = self.s.registry.update_release(_require(request.id, "id"),
                                             expect_status=("pending-gate", "blocked", "approved"),
                                             status="rejected", decided_by=current_principal().name, reason=reason)
        return convert.release(self.s.registry, row)

    async def ExportRelease(self, request, context):
        rel = self.s.registry.get_release(_require(request.id, "id"))
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
                s.registry.update_release(rel.id, expect_status=("approved", "released"), status="released",
                                          export_sha256=sha)
                return OperationResult(resource=f"releases/{rel.id}", result={"release_id": rel.id, "export_sha256": sha})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return convert.operation(s.ops.start("release-export", work, created_by=current_principal().name))


# ---- evals ---------------------------------------------------------------------------------------------
def start_eval(state: ServerState, candidate: str, base: str = "", suites: list[str] | None = None, limit: int = 0,
               created_by: str = "", schedule_id: str = ""):
    """Start an eval run as an operation (the RunEval RPC and the eval scheduler both use this).

    `candidate` is a release id (its adapter is plugged into its base model first) or a
    model id/name. The report's files become artifacts; a pending or blocked release gets
    the gate's verdict (pass keeps it pending for an admin's approval; block blocks it).
    """
    reg = state.registry
    release = None
    if candidate.startswith("rel_"):
        release = reg.get_release(candidate)
        cand_model = reg.get_model(release.model_id)
        base_model = gate_base_model(state, release, base)
    else:
        cand_model = reg.get_model(candidate)
        base_model = reg.get_model(base) if base else cand_model
    complete_scope = not suites and not limit
    runner = load_hook(state.config.eval_runner)
    exporter = load_hook(state.config.release_exporter) if release is not None else None

    def work(ctx: OperationContext) -> OperationResult:
        tmp = Path(tempfile.mkdtemp(prefix=f"eval-{ctx.op_id}-", dir=state.work_dir))
        try:
            base_src = state.resolve_model_source(base_model.source)
            if release is not None:
                ctx.progress(0.02, "preparing the candidate model")
                cand_dir = tmp / "candidate"
                if release.export_sha256:
                    # An uncompressed tar unpacks to no more than its own size.
                    extract_tar(state.store.path(release.export_sha256), cand_dir,
                                max_bytes=state.store.size(release.export_sha256))
                else:
                    exporter(state.resolve_model_source(cand_model.source), state.store.path(release.adapter_sha256),
                             cand_dir)
                cand_src = str(cand_dir)
            else:
                cand_src = state.resolve_model_source(cand_model.source)
            ctx.progress(0.1, "running the suites")
            out = tmp / "report"
            extra = {}
            if "cache_dir" in inspect.signature(runner).parameters:
                # Generations cached across runs: a re-run after a crash or a cancel resumes.
                extra["cache_dir"] = state.data_dir / "eval-cache"
            report = runner(candidate=cand_src, base=base_src, suites=suites or None, limit=limit or None,
                            out_dir=out, progress=False, **extra)
            ctx.check_cancelled()
            shas = {}
            for name in ("report.json", "report.html", "report.md", "samples.jsonl"):
                if (out / name).is_file():
                    shas[name] = state.store.put_file(out / name)
                    reg.add_artifact(shas[name], state.store.size(shas[name]), "eval-report", name)
            if "report.json" not in shas:
                shas["report.json"] = state.store.put_bytes(json.dumps(report, default=str).encode())
                reg.add_artifact(shas["report.json"], state.store.size(shas["report.json"]), "eval-report", "report.json")
            gate = report.get("gate") or {}
            verdict = gate.get("verdict") or "block"  # no verdict = incomplete = fail closed
            categories = [{"name": c.get("name", ""), "level": c.get("level", "")}
                          for c in report.get("categories", []) if isinstance(c, dict)]
            scope = {"suites": list(suites or []), "limit": int(limit or 0),
                     "complete": complete_scope and bool((report.get("run") or {}).get("complete"))}
            row = reg.add_eval_report(candidate=candidate, base=base_model.name, verdict=verdict, categories=categories,
                                      report_json_sha256=shas["report.json"],
                                      report_html_sha256=shas.get("report.html", ""),
                                      summary={"gate": gate, "artifacts": shas, "scope": scope},
                                      release_id=release.id if release else "",
                                      schedule_id=schedule_id, operation_id=ctx.op_id)
            applied, why = False, "not a release"
            if release is not None:
                complete = complete_scope and bool((report.get("run") or {}).get("complete"))
                applied, why = _apply_verdict(reg, release.id, row, verdict, gate, complete)
            return OperationResult(resource=f"eval-reports/{row.id}",
                                   result={"report_id": row.id, "verdict": verdict, "verdict_applied": applied,
                                           "why": why})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return state.ops.start("eval-run", work, created_by=created_by)


_LEVELS = ("Low", "Medium", "High", "Critical")


def gate_base_model(state: ServerState, release, asked: str = ""):
    """The gate compares a release with its own job's base model; a request cannot pick another."""
    reg = state.registry
    model_id = release.model_id
    if release.job_id:
        try:
            model_id = reg.get_job(release.job_id).model_id or model_id
        except NotFound:
            pass
    fixed = reg.get_model(model_id)
    if asked:
        other = reg.get_model(asked)
        if other.id != fixed.id:
            raise ValueError(f"release {release.id} is gated against its job's base model {fixed.name!r}; "
                             f"another base ({other.name[:64]!r}) is not accepted: drop --base")
    return fixed


def _level(gate: dict) -> int:
    try:
        return _LEVELS.index(str(gate.get("deployable_level") or "Medium"))
    except ValueError:
        return len(_LEVELS)  # unknown = the most permissive, so it never counts as stricter


def _as_strict(new: dict, old: dict) -> bool:
    """Is the policy behind gate result `new` the same as, or stricter than, `old`'s?"""
    if _level(new) < _level(old):
        return True
    return _level(new) == _level(old) and (new.get("policy") or "default") == (old.get("policy") or "default")


def _apply_verdict(reg, release_id: str, report, verdict: str, gate: dict, complete: bool) -> tuple[bool, str]:
    """Record a run's verdict on its release when the rules allow; every run stays in the history.

    A block always applies (fail closed). A pass replaces the release's verdict only when the
    run was complete (every suite, no --limit) and its policy is the same as or stricter than
    that of every earlier run that decided this release."""
    earlier = [r for r in reg.list_eval_reports(release_id=release_id)
               if r.id != report.id and (r.summary or {}).get("applied")]
    why = "applied"
    if verdict == "pass":
        if not complete:
            why = "a partial run (suite subset or --limit) cannot pass a release; it is kept in the history only"
        else:
            weaker = [r.id for r in earlier if not _as_strict(gate, (r.summary or {}).get("gate") or {})]
            if weaker:
                why = f"this run's policy is less strict than that of {', '.join(weaker)}; kept in the history only"
    applied = why == "applied"
    reg.update_eval_report_summary(report.id, applied=applied, why=why)
    release = reg.get_release(release_id)
    if applied:
        fields = {"gate_report_id": report.id, "gate_verdict": verdict}
        if release.status in ("pending-gate", "blocked"):
            fields["status"] = "pending-gate" if verdict == "pass" else "blocked"
        reg.update_release(release_id, **fields)
    if release.job_id:
        reg.add_job_event(release.job_id, "gate", {"release_id": release_id, "report_id": report.id,
                                                   "verdict": verdict, "applied": applied, "why": why})
    return applied, why


def earlier_blocks(reg, release) -> list[str]:
    """Reports that blocked this release before its current (passing) verdict."""
    return [r.id for r in reg.list_eval_reports(release_id=release.id)
            if r.verdict != "pass" and (r.summary or {}).get("applied") and r.id != release.gate_report_id]


def _suite_names(suites) -> list[str]:
    names = list(suites)
    for name in names:
        if not NAME_RE.match(name):
            raise ValueError(f"suite {name!r}: suite names are 1-64 letters, digits, . _ - (see `offsite-admin eval suites`)")
    return names


class EvalsService(evals_pb2_grpc.EvalsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    async def RunEval(self, request, context):
        if request.limit < 0:
            raise ValueError("limit must be >= 0 (0 = every item)")
        row = start_eval(self.s, _require(request.candidate, "candidate"), request.base, _suite_names(request.suites),
                         request.limit, created_by=current_principal().name)
        return convert.operation(row)

    async def GetEvalReport(self, request, context):
        return convert.eval_report(self.s.registry, self.s.registry.get_eval_report(_require(request.id, "id")))

    async def ListEvalReports(self, request, context):
        rows = self.s.registry.list_eval_reports(release_id=request.release_id or None,
                                                 schedule_id=request.schedule_id or None, limit=_limit(request.limit))
        return evals_pb2.ListEvalReportsResponse(reports=[convert.eval_report(self.s.registry, r) for r in rows])

    async def CreateEvalSchedule(self, request, context):
        from croniter import croniter

        cron = _require(request.cron.strip(), "cron")
        if not croniter.is_valid(cron):
            raise ValueError(f"cron {cron!r} is not a valid cron expression (five fields, e.g. '0 3 * * *')")
        candidate = _require(request.candidate, "candidate")
        if candidate.startswith("rel_"):
            gate_base_model(self.s, self.s.registry.get_release(candidate), request.base)
        else:
            self.s.registry.get_model(candidate)
            if request.base:
                self.s.registry.get_model(request.base)
        if request.limit < 0:
            raise ValueError("limit must be >= 0")
        now = utcnow()
        next_run = croniter(cron, now).get_next(type(now))
        row = self.s.registry.add_eval_schedule(request.name or f"{candidate}-{cron}", cron, candidate, request.base,
                                                _suite_names(request.suites), request.limit, next_run_at=next_run)
        return convert.eval_schedule(row)

    async def ListEvalSchedules(self, request, context):
        return evals_pb2.ListEvalSchedulesResponse(
            schedules=[convert.eval_schedule(r) for r in self.s.registry.list_eval_schedules(limit=_limit(request.limit))])

    async def DeleteEvalSchedule(self, request, context):
        self.s.registry.delete_eval_schedule(_require(request.id, "id"))
        return empty_pb2.Empty()


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

