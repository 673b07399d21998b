"""Run a command so that its whole process tree ends with it: on SIGTERM, or when its parent dies.

`python process_guard.py PARENT_PID [--rmtree DIR] -- CMD...` (run by path: it imports only
the standard library); DIR (the tree's temp directory) is removed once the tree has ended. Flower's local simulation SuperLink starts its SuperExec and `flwr-simulation` in
sessions of their own, and Ray starts more below those, so neither a process-group kill nor
the SuperLink's own shutdown reaches them all. The guard is a child subreaper (orphans of
the tree are re-parented to it, so it can always find them) with a parent-death signal (a
`kill -9` of the server still ends the tree): on SIGTERM it sends SIGTERM to every
descendant, waits GRACE_S, then SIGKILLs what is left and exits.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 2.0  # the server's operation manager SIGKILLs the guard's group 3 s after its SIGTERM


def _prctl(option: int, arg: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def descendants(root: int) -> list[int]:
    """Live (not zombie) processes below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def end_tree(grace_s: float = GRACE_S) -> None:
    me = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in descendants(me):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            _reap()
            if not descendants(me):
                return
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[argv.index("--") + 1 :]
    scratch = argv[argv.index("--rmtree") + 1] if "--rmtree" in argv[: argv.index("--")] else ""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    child = subprocess.Popen(cmd)
    while not stop and child.poll() is None:
        time.sleep(0.2)
    end_tree()
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return child.returncode if child.returncode is not None else 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
