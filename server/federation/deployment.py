"""Flower's Deployment Engine: certificates, node keys, the SuperLink, and submitting runs.

The topology (deploy/local starts it on one machine; across machines it is the same
commands): one SuperLink with TLS, SuperNode authentication and `--isolation process`
(its ServerApps run under a separate SuperExec that authenticates to the SuperLink's
Runtime API with a shared secret, so that API is not open to anyone on the port), runtime
dependency installation off, telemetry and update checks off; N SuperNodes, each with an
ECDSA P-384 key registered at the SuperLink (an unregistered node is refused), each
reading its own data and bundle cache from its node config.

`submit_run` drives a job with `flwr run`: the ServerApp reads the job from the run config
and writes rounds and the release to job.json and the registry itself (a deployed run
returns nothing through Flower), so the submitter watches job.json.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import JOB_FILE
from .config import FederationConfig
from offsite.files import atomic_write

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
APP_PUBLISHER = "offsite"
APP_NAME = "offsite-federation"


class DeploymentError(RuntimeError):
    """A deployment step failed; the message names the command and its output."""


def flower_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    env = dict(os.environ, **FLOWER_ENV)
    # SuperExec and SuperNodes launch flwr-serverapp / flwr-clientapp by name: put this venv first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _bin(name: str) -> str:
    """A Flower executable next to this interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# --- credentials ------------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A private CA and a SuperLink certificate for `hosts` (kept if already there)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    files = TlsFiles(d / "ca.pem", d / "superlink.pem", d / "superlink.key")
    if all(p.exists() for p in (files.ca_cert, files.server_cert, files.server_key)):
        return files
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Offsite federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    atomic_write(
        files.server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600
    )
    atomic_write(files.server_cert, cert.public_bytes(pem), 0o644)
    atomic_write(files.ca_cert, ca.public_bytes(pem), 0o644)
    return files


def make_secret(path: str | Path) -> Path:
    """The SuperExec shared secret (raw random bytes, mode 600), kept if already there."""
    path = Path(path)
    if not path.exists():
        atomic_write(path, secrets.token_bytes(32), 0o600)
    return path


# --- Flower CLI configuration -------------------------------------------------------------


def write_flwr_home(flwr_home: str | Path, name: str, address: str, ca_cert: str | Path) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection `name` (TLS, our CA)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    text = (
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n'
    )
    atomic_write(home / "config.toml", text.encode(), 0o644)
    return home


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


DEPLOYED_COMPONENTS = {
    "serverapp": "offsite.server.federation.server_app:app",
    "clientapp": "offsite.client.flower_app:app",
}


def write_app_dir(out: str | Path, components: dict | None = None, extra_config: dict | None = None) -> Path:
    """The Flower app: config only (components point at the installed offsite package).

    Every FederationConfig field (and each `extra_config` key) is declared with its default,
    so `flwr run -c` can set any of them; weights never go into the app bundle (Flower caps
    it at 10 MB anyway)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = {
        k: v
        for k, v in FederationConfig(job_id="", model="", bundle="", bundle_digest="", job_dir="")
        .to_run_config()
        .items()
    } | dict(extra_config or {})
    lines = [
        "# Generated by offsite.server.federation.deployment.write_app_dir; do not edit.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "0.1.0"',
        'description = "Offsite federated adapter training"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        f'publisher = "{APP_PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        *(f'{k} = "{v}"' for k, v in (components or DEPLOYED_COMPONENTS).items()),
        "",
        "[tool.flwr.app.config]",
    ] + [f'"{k}" = {_toml_value(v)}' for k, v in defaults.items()]
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return out


def write_run_config(cfg: FederationConfig, path: str | Path, extra: dict | None = None) -> Path:
    path = Path(path)
    entries = cfg.to_run_config() | dict(extra or {})
    path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in entries.items()))
    return path


# --- commands -------------------------------------------------------------------------------


def superlink_command(
    state_dir: Path, tls: TlsFiles, secret: Path, host: str = "127.0.0.1", port: int = 9092
) -> list[str]:
    return [
        _bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
        "--enable-supernode-auth",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
        "--disable-runtime-dependency-installation",
        "--database",
        str(state_dir / "superlink.db"),
        "--host",
        host,
        "--port",
        str(port),
    ]


def superexec_command(runtime_address: str, tls: TlsFiles, secret: Path) -> list[str]:
    """The SuperExec that runs ServerApps for the SuperLink (authenticated by the secret)."""
    return [
        _bin("flower-superexec"),
        "--runtime-api-address",
        runtime_address,
        "--root-certificates",
        str(tls.ca_cert),
        "--superexec-auth-secret-file",
        str(secret),
    ]


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def flwr(
    args: list[str],
    flwr_home: str | Path,
    timeout: float = 120,
    check: bool = True,
    check_cancelled=None,
    on_process=None,
) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI in its own process group, so a timeout or a cancel ends it and its children.

    `check_cancelled` (raises to stop) is polled while it runs; `on_process(popen)` lets the
    caller's operation terminate it from another thread."""
    cmd = [_bin("flwr"), *args]
    proc = subprocess.Popen(
        cmd,
        env=flower_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if on_process is not None:
        on_process(proc)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                out, errs = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if check_cancelled is not None:
                    check_cancelled()
                if time.monotonic() > deadline:
                    raise DeploymentError(
                        f"`flwr {args[0]}` did not answer within {timeout:g} s; is the SuperLink up?"
                    ) from None
    except BaseException:
        _kill_group(proc)
        raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, errs)
    if check_cancelled is not None:  # killed by a cancel: the cancel is the outcome, not a failure
        check_cancelled()
    if check and done.returncode != 0:
        raise DeploymentError(f"`flwr {' '.join(args[:1])}` failed ({done.returncode}): {(out + errs)[-2000:]}")
    return done


def register_supernode(
    public_key: str | Path, flwr_home: str | Path, superlink: str = "offsite", retries: int = 30
) -> dict:
    """Register a SuperNode's public key at the SuperLink (waits for the SuperLink to answer)."""
    last = None
    for _ in range(retries):
        proc = flwr(["supernode", "register", str(public_key), superlink, "--format", "json"], flwr_home, check=False)
        if proc.returncode == 0:
            try:
                return json.loads(proc.stdout)
            except json.JSONDecodeError:
                return {"output": proc.stdout}
        last = proc
        time.sleep(1)
    raise DeploymentError(f"could not register {public_key}: {(last.stdout + last.stderr)[-1500:]}")


def run_status(run_id: str, flwr_home: str | Path, superlink: str, check_cancelled=None, on_process=None) -> str:
    """The Flower run's status, e.g. "running" or "finished:completed" ("" when unknown)."""
    try:
        proc = flwr(
            ["ls", superlink, "--run-id", run_id, "--format", "json"],
            flwr_home,
            check=False,
            timeout=60,
            check_cancelled=check_cancelled,
            on_process=on_process,
        )
    except DeploymentError:
        return ""  # a slow answer on a busy machine is "unknown": the caller asks again; its deadline bounds the job
    try:
        runs = json.loads(proc.stdout).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def submit_run(
    cfg: FederationConfig,
    app_dir: str | Path,
    superlink: str,
    flwr_home: str | Path,
    wait: bool = True,
    on_round=None,
    timeout: float | None = None,
    stream: bool = False,
    check_cancelled=None,
    on_process=None,
    federation_config: dict | None = None,
    extra_run_config: dict | None = None,
    components: dict | None = None,
) -> dict:
    """`flwr run` the job; with `wait`, follow job.json until the job completes or fails.

    `flwr run` exits 0 even when the submission failed; its JSON says `success: false`, which
    fails here at once. While waiting, the Flower run's own status is read every few
    seconds (a run that finished without completing the job fails it), `check_cancelled` is
    polled, and the whole wait is bounded by `timeout` (default: rounds x round timeout + 10 min).
    `federation_config` (a simulation SuperLink's settings, e.g. num-supernodes) goes to
    `--federation-config`; `extra_run_config` adds run-config keys the app
    declares; `components` names the app's ServerApp/ClientApp (default: the deployed ones)."""
    manifest = Path(app_dir) / "pyproject.toml"
    if not manifest.exists() or manifest.read_text().startswith("# Generated by offsite"):
        # Regenerated: its config keys always match FederationConfig.
        app_dir = write_app_dir(app_dir, components, extra_run_config)
    job_dir = Path(cfg.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(cfg, job_dir / "run-config.toml", extra_run_config)
    job_file = job_dir / JOB_FILE
    # A resumed job's job.json still says how the last run ended: watch only what this run writes.
    stale = _stamp(job_file)
    federation = [
        a for k, v in (federation_config or {}).items() for a in ("--federation-config", f"{k}={_toml_value(v)}")
    ]
    proc = flwr(
        ["run", str(app_dir), superlink, "--format", "json", "--run-config", str(run_config), *federation],
        flwr_home,
        check_cancelled=check_cancelled,
        on_process=on_process,
    )
    try:
        submitted = json.loads(proc.stdout)
    except json.JSONDecodeError:
        submitted = {"output": proc.stdout[-2000:]}
    if not isinstance(submitted, dict):
        submitted = {"output": str(submitted)[-2000:]}
    (job_dir / "flower-run.json").write_text(json.dumps(submitted, indent=2))
    if submitted.get("success") is False or (wait and not submitted.get("run-id")):
        detail = submitted.get("error-message") or submitted.get("output") or proc.stderr[-1000:]
        raise DeploymentError(
            f"`flwr run` did not start the job: {str(detail)[-1000:]}; check the SuperLink "
            f"connection {superlink!r} in FLWR_HOME/config.toml"
        )
    if not wait:
        return {"id": cfg.job_id, "status": "submitted", "flower": submitted}
    deadline = time.monotonic() + (timeout or cfg.rounds * cfg.round_timeout + 600)
    seen = 0
    run_id = str(submitted.get("run-id", ""))
    next_check = time.monotonic() + 5
    while time.monotonic() < deadline:
        if check_cancelled is not None:
            check_cancelled()
        if time.monotonic() > next_check:
            next_check = time.monotonic() + 5
            status = run_status(run_id, flwr_home, superlink, check_cancelled=check_cancelled, on_process=on_process)
            if status.startswith("finished") and not status.endswith("completed"):
                time.sleep(1)  # let a last job.json write land
                fresh = job_file.exists() and _stamp(job_file) != stale
                job = json.loads(job_file.read_text()) if fresh else {"id": cfg.job_id}
                if job.get("status") not in ("completed", "failed"):
                    job.update(
                        status="failed", error=f"the Flower run {run_id} ended as {status!r}; see `flwr log {run_id}`"
                    )
                job["flower"] = submitted
                return job
        if job_file.exists() and (stale is None or _stamp(job_file) != stale):
            stale = None
            try:
                job = json.loads(job_file.read_text())
            except json.JSONDecodeError:  # replaced mid-read is impossible (atomic); a partial copy is not
                job = None
            if job:
                for record in job.get("rounds", [])[seen:]:
                    if on_round:
                        on_round(record)
                seen = len(job.get("rounds", []))
                if job.get("status") in ("completed", "failed"):
                    job["flower"] = submitted
                    return job
        time.sleep(0.5)
    raise DeploymentError(
        f"job {cfg.job_id} did not finish within {timeout or 0:g} s (the job policy's limit); "
        f"see `flwr ls` and the job's flower-run.json"
    )
