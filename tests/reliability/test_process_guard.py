"""process_guard ends a whole process tree, including processes that left its group.

Flower's SuperLink starts its SuperExec and flwr-simulation in sessions of their own, so
the guard must find them by descent, not by group. Here the guarded command starts a
`setsid` grandchild; the guard's parent is then killed with SIGKILL (as a `kill -9` of the
server) or the guard gets SIGTERM (a cancel), and the grandchild must be gone within seconds,
with the guard's temp directory removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offsite.server.federation import process_guard

GUARD = Path(process_guard.__file__)
# The guarded command: a grandchild in a new session (as Flower's SuperExec is), then wait.
TREE = "import subprocess, sys, time; p = subprocess.Popen(['setsid', 'sleep', '300']); print(p.pid, flush=True); time.sleep(300)"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.parametrize("how", ["parent-killed", "sigterm"])
def test_the_guard_ends_its_whole_tree(tmp_path, how):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # A parent process that starts the guard and reports the pids, so the test can kill the parent.
    parent_code = (
        "import os, subprocess, sys, time; "
        f"g = subprocess.Popen([sys.executable, {str(GUARD)!r}, str(os.getpid()), '--rmtree', {str(scratch)!r}, "
        f"'--', sys.executable, '-c', {TREE!r}], stdout=subprocess.PIPE, text=True, start_new_session=True); "
        "print(g.pid, g.stdout.readline().strip(), flush=True); time.sleep(300)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        guard_pid, grandchild = map(int, parent.stdout.readline().split())
        # `setsid` calls setsid() just after its exec, which can be after the pid was printed
        deadline = time.monotonic() + 10
        while _alive(grandchild) and os.getsid(grandchild) == os.getsid(guard_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _alive(grandchild) and os.getsid(grandchild) != os.getsid(guard_pid)  # outside the group
        if how == "parent-killed":
            parent.send_signal(signal.SIGKILL)
        else:
            os.kill(guard_pid, signal.SIGTERM)
        assert _wait_gone(grandchild), "a process of the guarded tree outlived the guard"
        assert _wait_gone(guard_pid)
        assert not scratch.exists(), "the guard left its temp directory"
    finally:
        parent.kill()
        parent.wait()
