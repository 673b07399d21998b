"""The data owner's side of enrollment and bundle download.

``enroll`` asks the server for a job's bundle, its signing key and the federation
settings, and saves them (with the token, mode 600) under the client home
(``$OFFSITE_CLIENT_HOME``, default ``~/.offsite-client``). ``fetch_bundle`` downloads the
bundle with the Artifacts service, resuming from the bytes already on disk whenever the
connection breaks, checks the sha256, verifies the Ed25519 signature of the manifest
(``offsite.emulators.bundle_format``: the signature before a byte is unpacked), and keeps the result in a cache keyed by the
digest, so a second fetch downloads nothing.

Only ``offsite.protos`` and ``offsite.emulators`` are used here: the client never imports
the server.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.emulators.bundle_format import BundleError, extract_bundle, verify_bundle
from offsite.emulators.keyring import load_keyring
from offsite.emulators.signing import SigningKeyError, key_id
from offsite.files import atomic_write, sha256_file
from offsite.protos.channel import open_channel
from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, jobs_pb2, jobs_pb2_grpc

# Codes after which a download is worth retrying: the server went away or the stream broke.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class FetchError(RuntimeError):
    """The bundle could not be fetched or did not verify; the message says why and what to do."""


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_digest(sha: str, source: str = "the server") -> str:
    """`sha` if it is a sha256 digest; it names files in the cache, so nothing else may pass."""
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise FetchError(
            f"{source} announced the bundle digest {sha[:80]!r}, which is not a sha256 "
            "(64 lowercase hex characters); refusing it. Ask the model owner to check the job's emulator"
        )
    return sha


def client_home() -> Path:
    return Path(os.environ.get("OFFSITE_CLIENT_HOME", Path.home() / ".offsite-client"))


def bundle_cache_dir() -> Path:
    base = os.environ.get("OFFSITE_CACHE", Path.home() / ".cache" / "offsite")
    return Path(base) / "bundles"


@dataclass
class Enrollment:
    server: str
    job_id: str
    data_owner: str
    bundle_sha256: str
    bundle_size: int
    public_key_path: str
    federation_address: str = ""
    emulator_id: str = ""
    base_model_digest: str = ""
    train_config: dict = field(default_factory=dict)
    federation: dict = field(default_factory=dict)
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    key_source: str = ""  # why the signing key is trusted: "pinned", "tls" or "insecure"

    def channel(self, token: str) -> grpc.Channel:
        return open_channel(self.server, token, self.ca, self.client_cert, self.client_key)


def _job_file(home: Path, job_id: str) -> Path:
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise FetchError(f"job id {job_id[:80]!r} is not valid (letters, digits, . _ -)")
    return home / "enrollments" / f"{job_id}.json"


def enroll(
    server: str,
    token: str,
    job_id: str,
    ca: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    public_key: str | Path | None = None,
    home: Path | None = None,
    insecure: bool = False,
) -> Enrollment:
    """Enroll in `job_id` and save what fetch and join need. With `public_key`, the server's
    signing key must equal it (pinning); otherwise the key received over the channel is kept,
    which is refused without TLS (anyone on the path could swap both key and bundle) unless
    `insecure` is set."""
    home = home or client_home()
    job_file = _job_file(home, job_id)
    tls = bool(ca or os.environ.get("OFFSITE_CA"))
    if public_key is None and not tls and not insecure:
        raise FetchError(
            f"{server} is reached without TLS and no --public-key pins the bundle signing key, so whoever "
            "sits on the network path could hand you their own key and bundle. Pass --public-key "
            "signing.pub (from the model owner) or --ca CA.pem for TLS; --insecure accepts the key as "
            "received (local tests only)"
        )
    channel = open_channel(server, token, ca, client_cert, client_key)
    try:
        resp = jobs_pb2_grpc.JobsStub(channel).Enroll(jobs_pb2.EnrollRequest(job_id=job_id))
    except grpc.RpcError as e:
        raise FetchError(_rpc_message(e, server)) from None
    finally:
        channel.close()
    if public_key is not None:
        _check_pinned(resp.bundle_public_key, public_key)
    check_digest(resp.bundle.sha256, f"the server at {server}")
    if resp.bundle.size <= 0:
        raise FetchError(f"the server at {server} announced a bundle of {resp.bundle.size} bytes; refusing it")
    if not _JOB_ID.match(resp.job_id):
        raise FetchError(f"the server at {server} answered with the job id {resp.job_id[:80]!r}, which is not valid")
    pub_path = home / "keys" / f"{job_id}.pub"
    atomic_write(pub_path, resp.bundle_public_key, 0o644)
    enrollment = Enrollment(
        server=server,
        job_id=resp.job_id,
        data_owner=resp.data_owner,
        bundle_sha256=resp.bundle.sha256,
        bundle_size=resp.bundle.size,
        public_key_path=str(pub_path),
        federation_address=resp.federation_address,
        emulator_id=resp.emulator_id,
        base_model_digest=resp.base_model_digest,
        train_config=_whole_numbers(MessageToDict(resp.train_config)),
        federation=_whole_numbers(MessageToDict(resp.federation)),
        ca=str(ca) if ca else None,
        client_cert=str(client_cert) if client_cert else None,
        client_key=str(client_key) if client_key else None,
        key_source="pinned" if public_key is not None else "tls" if tls else "insecure",
    )
    atomic_write(job_file, json.dumps({**asdict(enrollment), "token": token}, indent=2), 0o600)
    return enrollment


def _check_pinned(announced: bytes, pinned: str | Path) -> None:
    """The key the server announced for this job's bundle must be one the data owner pinned:
    a signing.pub, or a directory of them (keys kept across the model owner's key rotations)."""
    try:
        ring = load_keyring(pinned)
    except SigningKeyError as e:
        raise FetchError(f"--public-key: {e}") from None
    try:
        key = serialization.load_pem_public_key(announced)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"a {type(key).__name__}, not an Ed25519 key")
    except (ValueError, TypeError) as e:
        raise FetchError(
            f"the server announced a bundle signing key that is not an Ed25519 PEM public key ({e}); refusing to enroll"
        ) from None
    kid = key_id(key)
    if kid not in ring or ring[kid][0].public_bytes_raw() != key.public_bytes_raw():
        raise FetchError(
            f"the job's bundle is signed by key id {kid}, which differs from the pinned {pinned} (key id"
            f"{'s' if len(ring) > 1 else ''} {', '.join(sorted(ring))}); refusing to enroll. Ask the "
            f"model owner for the signing.pub of key {kid} (after a key rotation, pin a directory "
            "holding the old and the new signing.pub)"
        )


def _whole_numbers(value):
    # protobuf Struct keeps every number as a double; `steps: 20.0` must come back as 20.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def load_enrollment(job_id: str | None = None, home: Path | None = None) -> tuple[Enrollment, str]:
    """(enrollment, saved token) for `job_id`, or for the most recent enrollment."""
    home = home or client_home()
    if job_id:
        path = _job_file(home, job_id)
    else:
        files = sorted((home / "enrollments").glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise FetchError(
                f"no enrollment under {home}; run `offsite-client enroll --server S --token T --job J` first"
            )
        path = files[-1]
    if not path.is_file():
        raise FetchError(f"not enrolled in {job_id} (no {path}); run `offsite-client enroll --job {job_id}` first")
    data = json.loads(path.read_text())
    token = data.pop("token", "")
    return Enrollment(**data), token


def _rpc_message(e: grpc.RpcError, server: str) -> str:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the server at {server} ({e.details()}); check --server (and --ca for TLS)"
    return f"{code.name}: {e.details()}"


@dataclass
class FetchResult:
    path: Path  # the verified bundle directory
    sha256: str
    size: int
    downloaded: int  # bytes received over the network by this call
    cached: bool  # True when nothing had to be downloaded
    resumes: int  # times the download resumed after a broken connection
    seconds: float
    manifest: dict


def download_artifact(
    channel_factory: Callable[[], grpc.Channel],
    sha256: str,
    part: Path,
    on_progress: Callable[[int, int], None] | None = None,
    retries: int = 8,
    chunk_size: int = 0,
    backoff_s: float = 0.25,
    expected_size: int | None = None,
) -> tuple[int, int, int]:
    """Download into `part`, appending from its current size; returns (size, downloaded, resumes).

    A broken connection (server restart, network cut) is retried with exponential backoff
    from the byte where it stopped; errors a person must fix (not found, no permission)
    are raised at once. Never more bytes than `expected_size` (when given) or than the
    stream's own total are kept: the partial file is removed and the download refused.
    """
    check_digest(sha256)
    part.parent.mkdir(parents=True, exist_ok=True)
    downloaded = resumes = attempt = 0
    total = -1
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if expected_size is not None and offset > expected_size:
            part.unlink()  # a stale partial file longer than the artifact
            offset = 0
        channel = channel_factory()
        try:
            stub = artifacts_pb2_grpc.ArtifactsStub(channel)
            stream = stub.Download(artifacts_pb2.DownloadRequest(sha256=sha256, offset=offset, chunk_size=chunk_size))
            with open(part, "ab") as fh:
                for chunk in stream:
                    if chunk.sha256 != sha256 or chunk.offset != offset:
                        raise FetchError(
                            f"the server sent bytes for {chunk.sha256[:12]}@{chunk.offset}, expected "
                            f"{sha256[:12]}@{offset}; try again"
                        )
                    total = chunk.total_size
                    if expected_size is not None and total != expected_size:
                        problem = f"streams {total} bytes, {expected_size} were announced at enrollment"
                    elif offset + len(chunk.data) > total:
                        problem = f"sent more bytes than the {total} it announced"
                    else:
                        problem = ""
                    if problem:
                        fh.close()
                        part.unlink(missing_ok=True)
                        raise FetchError(
                            f"the server {problem} for {sha256[:12]}...; refusing the bundle (the partial "
                            "file was removed). Ask the model owner to check the server"
                        )
                    fh.write(chunk.data)
                    offset += len(chunk.data)
                    downloaded += len(chunk.data)
                    attempt = 0  # progress was made: the retry budget starts over
                    if on_progress is not None:
                        on_progress(offset, total)
                fh.flush()
                os.fsync(fh.fileno())
            if total < 0 or offset != total:
                raise FetchError(f"the stream ended at byte {offset} of {total}; try again")
            return total, downloaded, resumes
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                part.unlink(missing_ok=True)  # a stale partial file longer than the artifact
            elif e.code() == grpc.StatusCode.DATA_LOSS:
                part.unlink(missing_ok=True)  # the server's copy is corrupt: keep nothing received from it
                raise FetchError(_rpc_message(e, "the server") + "; the partial file was removed") from None
            elif e.code() not in _TRANSIENT:
                raise FetchError(_rpc_message(e, "the server")) from None
            attempt += 1
            if attempt > retries:
                raise FetchError(
                    f"download of {sha256[:12]} kept failing ({e.code().name}: {e.details()}); "
                    f"{part} keeps the {offset} bytes received, run fetch again to resume"
                ) from None
            resumes += 1
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 5.0))
        finally:
            channel.close()


def _verify(bundle: Path, public_key: str | Path) -> dict:
    try:
        return verify_bundle(bundle, public_key)
    except BundleError as e:
        raise FetchError(f"bundle failed verification: {e}") from None


def _unpack(archive: Path, dest: Path, public_key: str | Path) -> dict:
    """Check the manifest's signature first, then unpack only the files it lists, no larger
    than it says, hashed as they stream, into a sibling of `dest` inside the cache."""
    try:
        return extract_bundle(archive, dest, public_key)
    except BundleError as e:
        raise FetchError(f"bundle failed verification: {e}") from None


def fetch_bundle(
    enrollment: Enrollment,
    token: str,
    cache_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    retries: int = 8,
    chunk_size: int = 0,
) -> FetchResult:
    """Download (or reuse) the enrollment's bundle; returns the verified bundle directory."""
    sha = check_digest(enrollment.bundle_sha256, "the enrollment")
    cache = Path(cache_dir) if cache_dir else bundle_cache_dir()
    final = cache / sha
    start = time.perf_counter()
    if final.is_dir():
        # Re-verify the cached copy: a file changed on disk must not slip into training.
        manifest = _verify(final, enrollment.public_key_path)
        return FetchResult(final, sha, enrollment.bundle_size, 0, True, 0, time.perf_counter() - start, manifest)
    part = cache / "partial" / f"{sha}.part"
    size, downloaded, resumes = download_artifact(
        lambda: enrollment.channel(token),
        sha,
        part,
        on_progress,
        retries=retries,
        chunk_size=chunk_size,
        expected_size=enrollment.bundle_size,
    )
    actual = sha256_file(part)
    if actual != sha:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"downloaded bytes have sha256 {actual}, the server announced {sha}; the partial file was "
            "removed, fetch again"
        )
    manifest = _unpack(part, final, enrollment.public_key_path)
    part.unlink(missing_ok=True)
    return FetchResult(final, sha, size, downloaded, False, resumes, time.perf_counter() - start, manifest)
