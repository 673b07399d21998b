"""The server's shared state: configuration, registry, artifact store, auth, operations.

Everything the services need, in one object, so a test or another team's code can build
it without a gRPC server (e.g. the eval scheduler calls :meth:`ServerState.start_eval`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from offsite.files import atomic_write

from .artifacts import ArtifactStore
from .auth import ADMIN, Authenticator
from .hooks import (
    DEFAULT_EMULATOR_BUILDER,
    DEFAULT_EVAL_RUNNER,
    DEFAULT_EVAL_SCHEDULER,
    DEFAULT_JOB_RUNNER,
    DEFAULT_RELEASE_EXPORTER,
)
from .job_options import JOB_POLICY_FILE, JobPolicy, load_job_policy
from .operations import OperationManager
from .registry import Registry

log = logging.getLogger(__name__)

# The names offsite.emulators.models.KNOWN_MODELS loads (default, the optional `make qwen` model,
# tiny test models), spelled out so the server does not import torch to check a name;
# tests/test_server_state_models.py keeps the two equal.
BUILTIN_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "tiny-llama", "tiny-gpt2", "tiny-opt")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADMIN_TOKEN_FILE = "admin.token"


@dataclass
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    database_url: str | None = None  # default: sqlite in data_dir
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # set: mutual TLS, clients need a certificate from this CA
    signing_key: Path | None = None  # default: data_dir/keys/signing.key (created on first start)
    max_message_bytes: int = 8 * 1024 * 1024
    max_upload_bytes: int = 16 * 1024**3
    download_chunk_bytes: int = 512 * 1024  # measured best on loopback (bench.transport)
    op_workers: int = 2  # short operations: builds, evals, exports
    job_workers: int = 2  # federated jobs (long): their own pool, so they never starve the above
    job_policy: JobPolicy = field(default_factory=JobPolicy)  # bounds on what a job request may ask for
    grace_s: float = 10.0
    federation_address: str = ""  # told to data owners at enrollment
    max_watch_streams_per_data_owner: int = 4
    # Hooks: "module:function" strings, or callables when embedding the server (see hooks.py).
    job_runner: str | Callable = DEFAULT_JOB_RUNNER
    eval_runner: str | Callable = DEFAULT_EVAL_RUNNER
    emulator_builder: str | Callable = DEFAULT_EMULATOR_BUILDER
    release_exporter: str | Callable = DEFAULT_RELEASE_EXPORTER
    # Long-lived tasks on the server's event loop: `async def task(state: ServerState)`,
    # cancelled at shutdown. One whose module is not installed is skipped with a log line.
    background_tasks: list = field(default_factory=lambda: [DEFAULT_EVAL_SCHEDULER])
    extra: dict = field(default_factory=dict)


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.models_dir = self.data_dir / "models"
        self.work_dir = self.data_dir / "work"
        self.models_dir.mkdir(exist_ok=True)
        self.work_dir.mkdir(exist_ok=True)
        policy_file = self.data_dir / JOB_POLICY_FILE
        if config.job_policy == JobPolicy() and policy_file.is_file():
            config.job_policy = load_job_policy(policy_file)  # the admin's bounds, for `offsite-admin serve`
        self.registry = Registry(config.database_url or f"sqlite:///{self.data_dir / 'registry.db'}")
        self.store = ArtifactStore(self.data_dir / "artifacts")
        self.auth = Authenticator(self.registry)
        self.ops = OperationManager(self.registry, max_workers=config.op_workers, long_workers=config.job_workers)
        self.signing_key, self.public_key = self._signing_keys()
        self._remember_public_key()
        self.admin_token_path: Path | None = None

    def _remember_public_key(self) -> None:
        # Bundles signed before a key rotation verify with the keyring beside the key
        # (`offsite-admin keys rotate`); a server started before keyrings existed adds its key.
        from offsite.emulators.keyring import remember_public_key

        try:
            remember_public_key(self.signing_key.parent, self.public_key)
        except (OSError, ValueError) as e:  # a read-only key dir: the current key still verifies its bundles
            log.warning("could not add %s to the keyring: %s", self.public_key, e)

    def public_key_for(self, manifest: object) -> Path:
        """The public key file of the key that signed the bundle whose manifest this is (the key
        id it names, from the keyring; signing.pub for a manifest that names none). A key id the
        keyring lacks raises ValueError naming it."""
        from offsite.emulators.keyring import public_key_file

        return public_key_file(self.signing_key.parent, manifest)

    @property
    def verification_keys(self) -> Path:
        """keyring/ beside the signing key (every public key this server's bundles may be signed
        by), or signing.pub alone where no keyring could be written."""
        from offsite.emulators.keyring import KEYRING_DIR

        ring = self.signing_key.parent / KEYRING_DIR
        return ring if ring.is_dir() else self.public_key

    def _signing_keys(self) -> tuple[Path, Path]:
        if self.config.signing_key is not None:
            key = Path(self.config.signing_key)
            pub = key.with_suffix(".pub")
            if not key.is_file() or not pub.is_file():
                raise FileNotFoundError(
                    f"signing key {key} or its public half {pub} is missing; "
                    "create them with `offsite-admin keys init --dir DIR`"
                )
            return key, pub
        keys = self.data_dir / "keys"
        key, pub = keys / "signing.key", keys / "signing.pub"
        if not key.is_file():
            from offsite.emulators.signing import generate_signing_key

            key, pub = generate_signing_key(keys)
            log.info("created the bundle signing key %s", key)
        return key, pub

    def bootstrap_admin_token(self) -> Path | None:
        """On a registry with no admin token, create one and write it to data_dir/admin.token (mode 600)."""
        if self.registry.count_tokens(ADMIN) > 0:
            return None
        secret, _row = self.auth.create_token("admin", ADMIN)
        path = self.data_dir / ADMIN_TOKEN_FILE
        atomic_write(path, secret + "\n", 0o600)
        self.admin_token_path = path
        return path

    def rotate_admin_token(self, ttl_seconds: int = 0) -> tuple[Path, str]:
        """See :func:`rotate_admin_token`."""
        return rotate_admin_token(self.data_dir, self.registry, self.auth, ttl_seconds)

    def resolve_model_source(self, source: str) -> str:
        """A built-in model name, or a directory under data_dir/models (never an arbitrary path)."""
        if source in BUILTIN_MODELS:
            return source
        models_root = self.models_dir.resolve()
        if source and os.path.isabs(source) and "\x00" not in source:
            path = Path(source).resolve()
            if models_root in path.parents and path.is_dir():
                return str(path)  # a registered model's stored (already checked) location
        if not source or "\x00" in source or os.path.isabs(source) or ".." in Path(source).parts:
            raise ValueError(
                f"model source {source!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) or the name "
                f"of a Hugging Face model directory you copied into {self.models_dir}"
            )
        path = (self.models_dir / source).resolve()
        if self.models_dir.resolve() not in path.parents or not path.is_dir():
            raise ValueError(
                f"model source {source!r}: no directory {path}; copy the model directory into "
                f"{self.models_dir} first, or use a built-in name ({', '.join(BUILTIN_MODELS)})"
            )
        return str(path)

    def close(self) -> None:
        self.registry.close()


def rotate_admin_token(
    data_dir: Path, registry: Registry, auth: Authenticator, ttl_seconds: int = 0
) -> tuple[Path, str]:
    """Replace DATA_DIR/admin.token with a new admin token and revoke the one it held.

    Returns (path, new token id). The file is replaced atomically (mode 600); a running server
    sharing the registry refuses the old token within its auth cache's few seconds."""
    from .auth import hash_secret

    path = Path(data_dir) / ADMIN_TOKEN_FILE
    old = None
    if path.is_file():
        old = registry.token_by_hash(hash_secret(path.read_text().strip()))
    secret, row = auth.create_token("admin", ADMIN, ttl_seconds=ttl_seconds)
    atomic_write(path, secret + "\n", 0o600)
    if old is not None and old.revoked_at is None:
        auth.revoke(old.id)
    return path, row.id
