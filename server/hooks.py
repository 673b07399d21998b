"""Where other parts of Offsite plug into the server.

Each hook is a plain callable named by a ``module:attribute`` string in
:class:`~offsite.server.app.ServerConfig` (and on ``offsite-admin serve``), imported when
first used, so a team can ship its part without touching the server:

- **job runner** (federation): ``run_job(ctx: JobRunContext) -> None``. Runs a job's rounds;
  calls ``ctx.record_round`` after each and ``ctx.create_release`` at the end. Default
  ``offsite.server.federation:run_job``. It runs in an operation thread: check
  ``ctx.op.check_cancelled()`` (or ``ctx.progress``) between rounds.
- **eval runner** (safety): the signature of ``offsite.safety_evals.runner.run_eval``
  (candidate, base, suites, limit, out_dir, progress, policy_path) -> report dict.
- **emulator builder** (emulator-core): ``build(cfg: dict, signing_key: Path, out: Path,
  on_progress) -> manifest``; the default calls ``offsite.emulators.build.build_bundle``.
- **eval scheduler** (safety): ``async def run_scheduler(state: ServerState)``, a background
  task on the server's event loop until cancelled at shutdown. It polls
  ``state.registry.due_eval_schedules()``, starts runs with
  ``offsite.server.gate.start_eval(state, candidate, base, suites, limit, schedule_id=...)``
  and advances ``state.registry.update_eval_schedule(id, next_run_at=..., last_run_at=...)``.
- **release exporter**: ``export(base_source, adapter_path, out_dir) -> None`` writes an HF
  model directory; the default plugs the adapter in with ``offsite.emulators.plugin``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .job_options import JobPolicy

if TYPE_CHECKING:  # annotations only: `offsite-admin serve --help` should not load SQLAlchemy
    from .artifacts import ArtifactStore
    from .operations import OperationContext
    from .registry import EmulatorRow, JobRow, ModelRow, Registry, ReleaseRow, RoundRow

DEFAULT_JOB_RUNNER = "offsite.server.federation:run_job"
DEFAULT_EVAL_RUNNER = "offsite.safety_evals.runner:run_eval"
DEFAULT_EMULATOR_BUILDER = "offsite.server.hooks:build_emulator"
DEFAULT_RELEASE_EXPORTER = "offsite.server.hooks:export_release"
DEFAULT_EVAL_SCHEDULER = "offsite.server.eval_scheduler:run_scheduler"


class HookUnavailable(RuntimeError):
    """The hook's module is not installed or has no such attribute."""


def load_hook(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """Resolve a ``module:attribute`` string (or pass a callable through, for embedding and tests)."""
    if callable(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"hook {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise HookUnavailable(f"{spec}: module {e.name!r} is not available in this installation") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise HookUnavailable(f"{spec}: {module_name} has no attribute {attr!r}") from None


@dataclass
class JobRunContext:
    """What a job runner gets: the job, its bundle, and ways to report rounds and a release."""

    job: JobRow
    emulator: EmulatorRow
    model: ModelRow
    registry: Registry
    store: ArtifactStore
    op: OperationContext
    data_dir: Path
    bundle_path: Path  # the signed bundle tar in the artifact store (read-only)
    public_key_path: Path  # verifies the bundle
    work_dir: Path  # scratch space for this job (kept across restarts for resuming)
    data_owners: list[str] = field(default_factory=list)
    policy: JobPolicy = field(default_factory=lambda: JobPolicy())  # the admin's bounds (paths, timeouts)

    def progress(self, fraction: float, message: str = "") -> None:
        self.op.progress(fraction, message)

    def record_round(self, number: int, metrics: dict, adapter_path: str | Path | None = None) -> RoundRow:
        """Persist a completed round; the aggregated adapter (safetensors) becomes an artifact."""
        sha = ""
        if adapter_path is not None:
            sha = self.store.put_file(adapter_path)
            self.registry.add_artifact(sha, self.store.size(sha), "adapter", f"{self.job.id}-round{number}.safetensors")
        return self.registry.add_round(self.job.id, number, metrics, sha)

    def last_round(self) -> RoundRow | None:
        """The last completed round (resume from its adapter after a restart)."""
        return self.registry.last_round(self.job.id)

    def adapter_path(self, round_row: RoundRow) -> Path | None:
        return self.store.path(round_row.adapter_sha256) if round_row.adapter_sha256 else None

    def create_release(self, adapter_path: str | Path, metrics: dict | None = None) -> ReleaseRow:
        """The candidate release (status pending-gate) from the final adapter; the job's
        existing candidate when it has one (a runner restarted after its release, e.g. by a
        server killed before the job was marked completed, never makes a second)."""
        existing = self.registry.get_job(self.job.id).release_id
        if existing:
            self.log("the job already has its candidate release; not making another", release_id=existing)
            return self.registry.get_release(existing)
        sha = self.store.put_file(adapter_path)
        self.registry.add_artifact(sha, self.store.size(sha), "adapter", f"{self.job.id}-adapter.safetensors")
        return self.registry.create_release(self.job.id, self.model.id, sha, metrics or {})

    def log(self, message: str, **data: Any) -> None:
        self.registry.add_job_event(self.job.id, "log", {"message": message, **data})

    def set_federation_address(self, address: str) -> None:
        self.registry.update_job(self.job.id, federation_address=address)


def build_emulator(cfg: dict, signing_key: Path, out: Path, on_progress: Callable[[float, str], None]) -> dict:
    from offsite.emulators.build import BuildConfig, build_bundle

    config = BuildConfig(**cfg)
    return build_bundle(config, signing_key, out, progress=False, on_progress=on_progress)


def export_release(base_source: str, adapter_path: Path, out_dir: Path) -> None:
    from offsite.emulators.adapter import load_adapter
    from offsite.emulators.models import load_model
    from offsite.emulators.plugin import export_model_dir, plug_in

    loaded = load_model(base_source)
    state, meta = load_adapter(adapter_path)
    model = plug_in(loaded, state, meta)
    export_model_dir(model, loaded.tokenizer, out_dir)
