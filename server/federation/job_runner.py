"""Running a federated job: the simulation engine, the deployment engine, the server hook.

- `prepare_local_job`: the one-machine set-up behind `offsite-admin jobs local run`: registry and
  artifact store under --data-dir, a signed bundle (built once per model and options and
  reused), the job row, the corpus split into one shard per data owner, and a bundle
  cache that the clients read by digest.
- `run_simulation_job`: Flower's Simulation Engine (Ray) with N virtual data owners, through
  `flwr run` on a local simulation SuperLink (local_simulation).
- `run_deployment_job`: `flwr run` against a running SuperLink (see deploy/local).
- `run_job(ctx)`: the server's job-runner hook (`offsite.server.federation:run_job`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from offsite.client.flower_app import ClientSettings
from offsite.emulators.data import PYTHON_REFERENCE, load_examples, python_reference_split

from .checkpoint import JOB_FILE, write_json_atomic
from .config import FederationConfig

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class JobSetupError(RuntimeError):
    """The job cannot start: bad corpus, missing bundle or key; the message says what to do."""


@dataclass
class LocalJob:
    cfg: FederationConfig
    clients: int
    settings: ClientSettings
    data_dir: Path
    shards: list[str] = field(default_factory=list)


def quiet_flower() -> None:
    for k, v in FLOWER_ENV.items():
        os.environ.setdefault(k, v)


# --- set-up ---------------------------------------------------------------------------


def _signing_key(data_dir: Path) -> tuple[Path, Path]:
    from offsite.emulators.signing import generate_signing_key

    keys = data_dir / "keys"
    key, pub = keys / "signing.key", keys / "signing.pub"
    if not key.exists():
        key, pub = generate_signing_key(keys)
    return key, pub


def _build_or_reuse_bundle(data_dir: Path, model: str, build: dict, key: Path, progress: bool) -> Path:
    """A bundle for (model, build options), built once under DATA_DIR/bundles and reused."""
    from offsite.emulators.build import BuildConfig, build_bundle

    cfg = BuildConfig(model=model, **build)
    tag = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = data_dir / "bundles" / f"{Path(model).name}-{tag}"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_bundle(cfg, key, out, progress=progress)
    return out


def _split_corpus(corpus: str, clients: int, job_dir: Path) -> tuple[list[str], str]:
    """One data spec per data owner, and the model owner's held-out set."""
    if corpus == PYTHON_REFERENCE:
        python_reference_split(clients)  # fails early and clearly if N is too large
        return [f"{PYTHON_REFERENCE}:{i}/{clients}" for i in range(clients)], PYTHON_REFERENCE
    path = Path(corpus)
    if not path.exists():
        raise JobSetupError(
            f"--corpus {corpus}: no such file or directory; pass {PYTHON_REFERENCE!r} or a JSONL/text file or directory"
        )
    examples = load_examples(path)
    # Every 10th example is the model owner's held-out set; the rest go round-robin to owners.
    heldout = examples[::10]
    train = [e for i, e in enumerate(examples) if i % 10]
    if len(train) < clients:
        raise JobSetupError(
            f"--corpus {corpus} has {len(examples)} examples, {len(train)} after the held-out tenth; "
            f"each of the {clients} clients needs at least one: add data or use fewer --clients"
        )
    shard_dir = job_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    for i in range(clients):
        p = shard_dir / f"shard-{i}.jsonl"
        p.write_text(
            "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in train[i::clients])
        )
        specs.append(str(p))
    hp = job_dir / "heldout.jsonl"
    hp.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in heldout))
    return specs, str(hp)


def prepare_local_job(
    data_dir: str | Path,
    model: str,
    clients: int,
    rounds: int,
    corpus: str = PYTHON_REFERENCE,
    bundle: str | None = None,
    public_key: str | None = None,
    build: dict | None = None,
    name: str = "",
    engine: str = "simulation",
    progress: bool = False,
    client_threads: int = 1,
    **options,
) -> LocalJob:
    """Registry, bundle, job row, shards and client cache for a job on this machine."""
    from offsite.server.artifacts import ArtifactStore
    from offsite.server.registry import NotFound, Registry

    if clients < 1:
        raise JobSetupError("--clients must be at least 1")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    registry_url = f"sqlite:///{data_dir / 'registry.db'}"
    registry = Registry(registry_url)
    store = ArtifactStore(data_dir / "artifacts")
    if bundle:
        if not public_key:
            raise JobSetupError("--bundle needs --public-key (the signing.pub it was signed with)")
        bundle_path, pub = Path(bundle).resolve(), Path(public_key).resolve()
    else:
        key, pub = _signing_key(data_dir)
        bundle_path = _build_or_reuse_bundle(data_dir, model, build or {}, key, progress)
        if (bundle_path / "manifest.json").is_file():  # a bundle reused from before `keys rotate`: its own key
            from offsite.emulators.bundle_format import read_manifest_unverified
            from offsite.emulators.keyring import public_key_file

            try:
                pub = public_key_file(key.parent, read_manifest_unverified(bundle_path)).resolve()
            except ValueError as e:
                raise JobSetupError(f"{bundle_path}: {e}") from None
    if not bundle_path.is_dir():
        raise JobSetupError(f"{bundle_path}: pass an unpacked bundle directory")
    from offsite.emulators.bundle import verify_bundle

    manifest = verify_bundle(bundle_path, pub)
    model_name = Path(model).name if Path(model).is_dir() else model
    try:
        model_row = registry.get_model(model_name)
    except NotFound:
        model_row = registry.add_model(
            model_name, source=model, digest=manifest.get("base_model", {}).get("digest", "")
        )
    bundle_sha = store.put_dir_as_tar(bundle_path)
    registry.add_artifact(bundle_sha, store.size(bundle_sha), "bundle", f"{bundle_path.name}.tar")
    emulator = registry.add_emulator(model_row.id, bundle_sha, build or {}, manifest)
    digest = bundle_sha  # clients cache bundles by artifact sha256 (as `offsite-client fetch` does)
    spec = {
        "engine": engine,
        "rounds": rounds,
        "min_clients": options.get("min_clients", min(2, clients)),
        "fraction": options.get("fraction", 1.0),
        "clients": clients,
        "corpus": corpus,
        "options": dict(options),
    }
    job = registry.add_job(name or f"{model_name}-{engine}", model_row.id, emulator.id, spec)
    job_dir = data_dir / "work" / job.id
    job_dir.mkdir(parents=True, exist_ok=True)
    # The job's own cache, and the data dir's shared one (deploy/local's SuperNodes read it).
    for cache in (job_dir / "bundle-cache", data_dir / "bundle-cache"):
        cache.mkdir(exist_ok=True)
        if not (cache / digest).exists():
            (cache / digest).symlink_to(bundle_path, target_is_directory=True)
    cache = job_dir / "bundle-cache"
    shards, heldout = _split_corpus(corpus, clients, job_dir)
    options.setdefault("min_clients", min(2, clients))
    cfg = FederationConfig(
        job_id=job.id,
        model=model,
        bundle=str(bundle_path),
        bundle_digest=digest,
        job_dir=str(job_dir),
        public_key=str(pub),
        rounds=rounds,
        heldout=heldout,
        registry_url=registry_url,
        artifacts_root=str(data_dir / "artifacts"),
        **options,
    )
    template = data_template(corpus, clients, job_dir)
    settings = ClientSettings(data=template, bundle_cache=str(cache), public_key=str(pub), threads=client_threads)
    write_json_atomic(
        job_dir / "federation.json",
        {"config": cfg.to_run_config(), "clients": clients, "shards": shards, "client_settings": settings.__dict__},
    )
    registry.close()
    return LocalJob(cfg=cfg, clients=clients, settings=settings, data_dir=data_dir, shards=shards)


def data_template(corpus: str, clients: int, job_dir: Path) -> str:
    """The clients' data spec, with `{partition}` standing for each simulated owner's index."""
    if corpus == PYTHON_REFERENCE:
        return f"{PYTHON_REFERENCE}:{{partition}}/{clients}"
    return str(job_dir / "shards" / "shard-{partition}.jsonl")


def load_local_job(data_dir: str | Path, job_id: str) -> LocalJob:
    """A job prepared earlier (to resume it after a restart)."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / "work" / job_id / "federation.json"
    if not path.exists():
        raise JobSetupError(
            f"no federated job {job_id} under {data_dir}/work; `offsite-admin jobs local run` prints the job id"
        )
    saved = json.loads(path.read_text())
    return LocalJob(
        FederationConfig.from_run_config(saved["config"]),
        int(saved["clients"]),
        ClientSettings(**saved["client_settings"]),
        data_dir,
        saved["shards"],
    )


# --- engines ----------------------------------------------------------------------------


def simulation_backend(workers: int | None = None) -> dict:
    """Ray settings: one CPU per virtual client at a time, `workers` of them in parallel."""
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": workers,
            "num_gpus": 0,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


def run_simulation_job(
    job: LocalJob,
    workers: int | None = None,
    client_app=None,
    evaluator=None,
    on_round=None,
    log_path: str | Path | None = None,
    **watch,
) -> dict:
    """Run all rounds with Flower's Simulation Engine; returns the job (as in job.json).

    The engine runs as Flower 1.42 recommends: `flwr run` on a local simulation SuperLink
    (local_simulation), in child processes whose output goes to `log_path` (default
    JOB_DIR/flower-simulation/flower.log). `watch` passes timeout/check_cancelled/on_process
    to the job.json watch. A test or bench that injects its own `client_app` or `evaluator`
    (Python objects, which cannot travel to another process) gets the in-process engine."""
    quiet_flower()
    if client_app is None and evaluator is None:
        from .local_simulation import run_local_simulation
        from .simulation_app import client_run_config

        return run_local_simulation(
            job.cfg,
            job.clients,
            client_run_config(job.settings),
            workers=workers,
            on_round=on_round,
            log_path=log_path,
            **watch,
        )
    return run_inprocess_simulation(job, workers, client_app, evaluator, on_round)


def run_inprocess_simulation(job: LocalJob, workers=None, client_app=None, evaluator=None, on_round=None) -> dict:
    """`flwr.simulation.run_simulation` in this process (deprecated by Flower; for injected apps)."""
    # Ray starts its workers at nice 15; on a shared machine that starves the very clients
    # the simulation is made of, while the ServerApp (driver) runs at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from flwr.simulation import run_simulation

    from offsite.client.flower_app import make_client_app

    from .server_app import make_server_app

    result: dict = {}
    server_app = make_server_app(job.cfg, "simulation", evaluator=evaluator, result=result, on_round=on_round)
    run_simulation(
        server_app=server_app,
        client_app=client_app or make_client_app(job.settings),
        num_supernodes=job.clients,
        backend_config=simulation_backend(workers),
    )
    return read_job(job.cfg.job_dir) if not result else result


def read_job(job_dir: str | Path) -> dict:
    path = Path(job_dir) / JOB_FILE
    if not path.exists():
        raise JobSetupError(f"{path}: the job has not started (no {JOB_FILE})")
    return json.loads(path.read_text())


def run_deployment_job(
    job: LocalJob, app_dir: str | Path, superlink: str, flwr_home: str | Path, stream: bool = False
) -> dict:
    """Submit the job to a running SuperLink with `flwr run`; results arrive in job.json/registry."""
    from .deployment import submit_run

    return submit_run(job.cfg, app_dir, superlink, flwr_home, stream=stream)


# --- the server's hook --------------------------------------------------------------------


def _database_password_env(url: str) -> dict:
    """PGPASSWORD for the simulation's ServerApp process: its run config carries the URL without it."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: nothing to pass
        return {}
    return {"PGPASSWORD": str(password)} if password else {}


def run_job(ctx) -> None:
    """`offsite.server.federation:run_job`: run a job the gRPC server was asked to start.

    The job's spec names the engine: "simulation" runs `options.clients` data owners on this
    machine over the built-in corpus; "deployment" submits to the SuperLink that the admin
    configured (`ctx.policy`: connection name and FLWR_HOME). The spec is validated again
    here (typed options, the admin's bounds), and every path is derived under the data dir:
    nothing in a request names a file, a directory or a command."""
    from offsite.server.job_options import deployment_paths, federation_overrides, validate_stored_spec
    from offsite.server.registry import url_without_password

    quiet_flower()
    policy = ctx.policy
    spec = validate_stored_spec(dict(ctx.job.spec or {}), policy)
    options = spec["options"]
    engine = spec["engine"]
    from .server_app import FederatedJob  # noqa: F401  (import errors surface before the run)

    clients = int(options.get("clients") or max(1, len(ctx.data_owners)))
    corpus = PYTHON_REFERENCE  # the only corpus a request may name (options.corpus is checked above)
    job_dir = Path(ctx.work_dir)
    bundle_root = job_dir / "bundle"
    if not (bundle_root / "manifest.json").exists():
        from offsite.emulators.bundle import extract_bundle

        # Signature first, then only the listed files, unpacked beside bundle_root and renamed into place.
        extract_bundle(ctx.bundle_path, bundle_root, ctx.public_key_path)
    digest = ctx.emulator.bundle_sha256
    cache = job_dir / "bundle-cache"
    cache.mkdir(exist_ok=True)
    if not (cache / digest).exists():
        (cache / digest).symlink_to(bundle_root, target_is_directory=True)
    shards, heldout = _split_corpus(corpus, clients, job_dir)
    overrides = federation_overrides(spec)
    overrides.setdefault("round_timeout", policy.default_round_timeout_s)
    cfg = FederationConfig(
        job_id=ctx.job.id,
        model=ctx.model.source or ctx.model.name,
        bundle=str(bundle_root),
        bundle_digest=digest,
        job_dir=str(job_dir),
        public_key=str(ctx.public_key_path),
        rounds=spec["rounds"],
        min_clients=spec["min_clients"],
        fraction=spec["fraction"],
        heldout=heldout,
        # The run config reaches every SuperNode: never the database password (the SuperExec has it).
        registry_url=url_without_password(ctx.registry.url),
        artifacts_root=str(ctx.store.root),
        candidate_dir=str(job_dir / "candidate"),
        **overrides,
    )
    timeout = policy.job_timeout_s(options, cfg.rounds)

    started = time.monotonic()

    def on_round(record: dict) -> None:
        ctx.progress(
            record["round"] / cfg.rounds, f"round {record['round']}/{cfg.rounds}: {len(record['clients'])} clients"
        )
        ctx.op.check_cancelled()  # raises inside the ServerApp: the job stops after a persisted round
        if time.monotonic() - started > timeout:  # each round is bounded by round_timeout; the job by this
            raise JobSetupError(f"job {cfg.job_id} ran past its time limit ({timeout:g} s, the job policy's bound)")

    if engine == "simulation":
        template = data_template(corpus, clients, job_dir)
        settings = ClientSettings(data=template, bundle_cache=str(cache), public_key=str(ctx.public_key_path))
        # `flwr run` on a local simulation SuperLink owned by this job: a cancel or the time
        # limit stops its process group at once, as `flwr stop` does for a deployment.
        job = run_simulation_job(
            LocalJob(cfg, clients, settings, Path(ctx.data_dir), shards),
            on_round=on_round,
            timeout=timeout,
            check_cancelled=ctx.op.check_cancelled,
            on_process=getattr(ctx.op, "track_process", None),
            env=_database_password_env(ctx.registry.url),
        )
    else:
        from .deployment import flwr, submit_run

        paths = deployment_paths(Path(ctx.data_dir), policy)
        try:
            job = submit_run(
                cfg,
                paths.app_dir,
                paths.superlink,
                paths.flwr_home,
                wait=True,
                on_round=on_round,
                timeout=timeout,
                check_cancelled=ctx.op.check_cancelled,
                on_process=getattr(ctx.op, "track_process", None),
            )
        except BaseException:
            run_id = (
                json.loads((job_dir / "flower-run.json").read_text()).get("run-id")
                if (job_dir / "flower-run.json").exists()
                else None
            )
            if run_id:  # do not leave the Flower run going when the operation is cancelled or fails
                flwr(["stop", str(run_id), paths.superlink], paths.flwr_home, check=False, timeout=30)
            raise
    if job.get("status") != "completed":
        raise RuntimeError(f"job {cfg.job_id} {job.get('status')}: {job.get('error', '')}")
