"""A job's state machine: claim it, run the job-runner hook as an operation, end it, cancel it.

``created|failed|cancelled -> running`` is claimed in one transaction (two StartJob calls
cannot both run a job); the operation ends it as completed, failed or cancelled; CancelJob
cancels the operation (terminating the runner's child processes) and always ends the job.
"""

from __future__ import annotations

import asyncio

from .hooks import JobRunContext, load_hook
from .operations import OperationCancelled, OperationContext, OperationResult
from .registry import Conflict
from .state import ServerState

DONE_JOB_STATES = ("completed", "failed", "cancelled")


def end_job(state: ServerState, job_id: str, end: str, error: str = "") -> None:
    """Move a running job to `end`; a job already ended (e.g. cancelled by CancelJob) keeps its state."""
    fields = {"state": end, "error": error} if error else {"state": end}
    try:
        state.registry.update_job(job_id, expect_state=("running",), **fields)
    except Conflict:
        pass


def start_job(state: ServerState, job_id: str, created_by: str = ""):
    """Claim the job and run the job-runner hook on it as an operation; returns the operation row."""
    reg = state.registry
    job = reg.get_job(job_id)
    if job.state == "completed":
        raise Conflict(f"job {job.id} has completed; create a new job to train again")
    runner = load_hook(state.config.job_runner)
    emulator = reg.get_emulator(job.emulator_id)
    model = reg.get_model(job.model_id)
    # Claim the job first (one transaction), so two StartJob calls cannot both run it.
    previous = job.state
    try:
        reg.update_job(job_id, expect_state=("created", "failed", "cancelled"), state="running", error="")
    except Conflict:
        raise Conflict(f"job {job_id} is already running (operation {reg.get_job(job_id).operation_id})") from None

    def work(ctx: OperationContext) -> OperationResult:
        work_dir = state.work_dir / job_id
        work_dir.mkdir(exist_ok=True)
        run_ctx = JobRunContext(
            job=reg.get_job(job_id),
            emulator=emulator,
            model=model,
            registry=reg,
            store=state.store,
            op=ctx,
            data_dir=state.data_dir,
            bundle_path=state.store.path(emulator.bundle_sha256),
            public_key_path=state.public_key_for(emulator.manifest),  # its signer, after rotations too
            work_dir=work_dir,
            data_owners=reg.enrolled_data_owners(job_id),
            policy=state.config.job_policy,
        )
        try:
            runner(run_ctx)
            ctx.check_cancelled()
        except OperationCancelled:
            end_job(state, job_id, "cancelled")
            raise
        except Exception as e:
            end_job(state, job_id, "failed", f"{type(e).__name__}: {e}"[:2000])
            raise
        final = reg.get_job(job_id)
        if final.state == "running":  # a runner may have recorded its own end state already
            final = reg.update_job(job_id, state="completed")
        if final.state in ("failed", "cancelled"):
            raise RuntimeError(f"the job runner ended the job as {final.state}: {final.error}")
        return OperationResult(
            resource=f"jobs/{job_id}",
            result={"job_id": job_id, "release_id": final.release_id, "rounds": final.current_round},
        )

    try:
        row = state.ops.start("job-run", work, created_by=created_by)
    except BaseException:
        reg.update_job(job_id, state=previous)
        raise
    reg.update_job(job_id, operation_id=row.id)
    return row


async def cancel_job(state: ServerState, job_id: str):
    """Cancel a job; a running one's operation is cancelled (its child processes terminated)
    and the job is ended even if its runner has not stopped yet. Returns the job row."""
    reg = state.registry
    job = reg.get_job(job_id)
    if job.state in DONE_JOB_STATES:
        raise Conflict(f"job {job.id} is already {job.state}")
    if job.state == "running" and job.operation_id:
        state.ops.cancel(job.operation_id)
        # The runner thread marks the job cancelled when it stops; wait briefly for that.
        for _ in range(50):
            if reg.get_job(job.id).state != "running":
                break
            await asyncio.sleep(0.1)
        end_job(state, job.id, "cancelled")
    else:
        reg.update_job(job.id, state="cancelled")
    return reg.get_job(job.id)
