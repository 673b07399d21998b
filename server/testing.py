"""Helpers for tests and benchmarks that need a real server: a tiny signed bundle (built
once per process), a server in a thread, a server in a child process that can be killed.

Other teams' end-to-end tests (federation, safety) can use these too.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_LISTENING = re.compile(r"offsite server listening on (\S+):(\d+)")


@dataclass(frozen=True)
class TinyBundle:
    key_dir: Path  # signing.key + signing.pub
    bundle_dir: Path
    tar_path: Path
    sha256: str

    @property
    def signing_key(self) -> Path:
        return self.key_dir / "signing.key"

    @property
    def public_key(self) -> Path:
        return self.key_dir / "signing.pub"


@functools.lru_cache(maxsize=4)
def tiny_bundle(model: str = "tiny-llama") -> TinyBundle:
    """Build (once per process) a signed bundle of a tiny model, and its reproducible tar."""
    from offsite.emulators.signing import generate_signing_key

    from .artifacts import ArtifactStore
    from .hooks import build_emulator

    root = Path(tempfile.mkdtemp(prefix="offsite-tiny-bundle-"))
    generate_signing_key(root / "keys")
    build_emulator({"model": model}, root / "keys" / "signing.key", root / "bundle", lambda *_: None)
    store = ArtifactStore(root / "store")
    sha = store.put_dir_as_tar(root / "bundle")
    tar = root / "bundle.tar"
    shutil.copyfile(store.path(sha), tar)
    return TinyBundle(root / "keys", root / "bundle", tar, sha)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`offsite-admin serve` in a child process (so a test can SIGKILL it)."""

    def __init__(
        self, data_dir: Path, port: int | None = None, extra_args: list[str] | None = None, env: dict | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def start(self, timeout: float = 60.0) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "offsite.server.cli.main",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        self._log_fh = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_fh, env=self.env)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if _LISTENING.search(line):
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"server did not start (exit {self.proc.poll()}); log: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no graceful anything, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
