"""Flower's Simulation Engine the way Flower 1.42 runs it: `flwr run` on a local simulation SuperLink.

Per job: a `flower-superlink --simulation --isolation subprocess` on a free loopback port
(insecure, loopback only; FLWR_HOME, its state and its log under JOB_DIR/flower-simulation),
a Flower configuration with one connection to it, then `flwr run APP local-simulation
--federation-config num-supernodes=N ...` and the same job.json watch as a deployment
(`deployment.submit_run`). The SuperLink runs the ServerApp and the Ray backend in its own
`flwr-simulation` child, so nothing of Ray or Flower stays in the caller's process, and its
output goes to the log file, not the caller's terminal. The SuperLink runs under
process_guard, so when the job ends, fails or is cancelled, or the caller is killed, its whole
process tree (SuperExec, flwr-simulation, Ray) is stopped and its temp directory removed: a
cancel takes effect at once, as `flwr stop` does for a deployment.

Flower's managed local SuperLink (`address = ":local:"`) is the same runtime, but it detaches
one long-lived SuperLink per FLWR_HOME on fixed ports (39091/39093): concurrent servers and
tests would share it, and nothing would stop it. Here each job owns its SuperLink.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import FederationConfig
from .deployment import DeploymentError, _bin, _kill_group, flower_env, run_status, submit_run
from .process_guard import GRACE_S

CONNECTION = "local-simulation"
COMPONENTS = {
    "serverapp": "offsite.server.federation.simulation_app:server_app",
    "clientapp": "offsite.server.federation.simulation_app:client_app",
}
START_TIMEOUT_S = 90.0  # a busy 2-core machine takes 3-20 s
FINISH_WAIT_S = 30.0  # after job.json says completed, the Flower run's own end (Ray shutdown)
GUARD = Path(__file__).with_name("process_guard.py")


@dataclass
class LocalSuperLink:
    address: str
    flwr_home: Path
    log_path: Path
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextmanager
def local_superlink(
    state_dir: str | Path, log_path: str | Path | None = None, env: dict | None = None, on_process=None
):
    """A simulation-mode SuperLink for the duration of the block; its process tree ends with it."""
    state = Path(state_dir)
    home = state / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else state / "flower.log"
    # Ray's session files (and any other temp files of the tree) go to a directory of this job's
    # own, removed with it. Its path must stay short: Ray's socket paths below it
    # (ray/session_<time>_<pid>/sockets/plasma_store, ~70 bytes) must fit in 107 bytes, or Ray
    # cannot start; a long $TMPDIR is passed over for /tmp.
    base = tempfile.gettempdir()
    scratch = tempfile.mkdtemp(prefix=f"offsite-sim-{os.getpid()}-", dir=base if len(base) <= 20 else "/tmp")
    env = {"RAY_TMPDIR": scratch, "TMPDIR": scratch} | dict(env or {})
    try:
        with _guarded_superlink(state, home, log_path, env, on_process) as link:
            yield link
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _guarded_superlink(state: Path, home: Path, log_path: Path, env: dict, on_process):
    for _attempt in range(3):  # the free port can be taken between the probe and the bind
        address = f"127.0.0.1:{_free_port()}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
        )
        cmd = [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            address.rsplit(":", 1)[1],
        ]
        child_env = flower_env(home) | {"RAY_worker_niceness": "0"} | env
        # Under the guard: the SuperLink's SuperExec, flwr-simulation and Ray end with it, and
        # their temp directory goes, also when this process is killed (process_guard).
        guarded = [sys.executable, str(GUARD), str(os.getpid()), "--rmtree", env["RAY_TMPDIR"], "--", *cmd]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                guarded, env=child_env, stdout=log, stderr=subprocess.STDOUT, cwd=state, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _healthy(address):
            time.sleep(0.3)
        if proc.poll() is None and _healthy(address):
            if on_process is not None:  # the caller's operation can end the group (cancel, shutdown)
                on_process(proc)
            break
        _stop(proc)
        if time.monotonic() >= deadline:
            raise DeploymentError(
                f"the local simulation SuperLink did not answer within {START_TIMEOUT_S:g} s; see {log_path}"
            )
    else:
        raise DeploymentError(f"the local simulation SuperLink would not start: {_log_tail(log_path)}")
    try:
        yield LocalSuperLink(address, home, log_path, proc)
    finally:
        _stop(proc)


def _stop(guard: subprocess.Popen) -> None:
    """SIGTERM the guard (it ends the whole tree within GRACE_S); kill its group if it hangs."""
    if guard.poll() is None:
        guard.send_signal(signal.SIGTERM)
        try:
            guard.wait(GRACE_S + 10)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(guard)


def federation_config(clients: int, workers: int | None = None) -> dict:
    """The simulation runtime's settings: one CPU per virtual client, `workers` at a time."""
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    return {
        "num-supernodes": clients,
        "backend": "ray",
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0,
        "init-args-num-cpus": workers,
        "init-args-num-gpus": 0,
        "init-args-logging-level": "ERROR",
        "init-args-log-to-driver": False,
    }


def run_local_simulation(
    cfg: FederationConfig,
    clients: int,
    client_config: dict,
    workers: int | None = None,
    on_round=None,
    timeout: float | None = None,
    check_cancelled=None,
    on_process=None,
    log_path: str | Path | None = None,
    env: dict | None = None,
) -> dict:
    """Run the job on a local simulation SuperLink; returns the job (as in job.json)."""
    state = Path(cfg.job_dir) / "flower-simulation"
    with local_superlink(state, log_path, env, on_process) as link:

        def watch() -> None:
            if check_cancelled is not None:  # first: a cancel also ends the SuperLink
                check_cancelled()
            if link.process.poll() is not None:
                raise DeploymentError(
                    f"the local simulation SuperLink exited ({link.process.returncode}) during job {cfg.job_id}: "
                    f"{_log_tail(link.log_path, 800)}"
                )

        job = submit_run(
            cfg,
            state / "app",
            CONNECTION,
            link.flwr_home,
            wait=True,
            on_round=on_round,
            timeout=timeout,
            check_cancelled=watch,
            on_process=on_process,
            federation_config=federation_config(clients, workers),
            extra_run_config=client_config,
            components=COMPONENTS,
        )
        _wait_run_end(cfg, link, watch)
        return job


def _wait_run_end(cfg: FederationConfig, link: LocalSuperLink, watch) -> None:
    """Let the Flower run end by itself (its last registry writes, Ray's shutdown), bounded."""
    try:
        run_id = str(json.loads((Path(cfg.job_dir) / "flower-run.json").read_text()).get("run-id") or "")
    except (OSError, json.JSONDecodeError):
        return
    deadline = time.monotonic() + FINISH_WAIT_S
    while run_id and time.monotonic() < deadline:
        if run_status(run_id, link.flwr_home, CONNECTION, check_cancelled=watch).startswith("finished"):
            return
        time.sleep(0.5)
