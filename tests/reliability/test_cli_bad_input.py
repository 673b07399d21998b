"""Every CLI command (found by walking both typer apps, so a new one is covered the day it
lands) given bad input: an unknown option, a word where a number belongs, missing input
files and unwritable outputs, files of the wrong kind. Each must end with a clean exit
(2 for usage, 1 for a failure), one error line naming the problem, no traceback, and
nothing written next to the inputs.

Server commands point at a closed loopback port: they must fail with 1 and a readable line.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from offsite.client.cli import app as client_app
from offsite.server.cli.main import app as admin_app

DEAD_SERVER = ["--server", "127.0.0.1:1", "--token", "not-a-token"]
# Whole pipelines with no required input: given defaults they would run for minutes.
LONG_WITH_DEFAULTS = {("offsite-admin", "demo")}
WRITE_ONLY = {"canaries"}  # `evals local canaries --out F`


def _leaves(group: click.Command, path: tuple[str, ...]):
    if isinstance(group, click.Group):
        for name, cmd in sorted(group.commands.items()):
            yield from _leaves(cmd, path + (name,))
    else:
        yield path, group


APPS = {"offsite-admin": admin_app, "offsite-client": client_app}
COMMANDS = [(path, cmd) for name, app in APPS.items() for path, cmd in _leaves(typer.main.get_command(app), (name,))]
IDS = [" ".join(p) for p, _ in COMMANDS]


def _is_path(param: click.Parameter) -> bool:
    return isinstance(param.type, click.Path) or "path" in type(param.type).__name__.lower()


def _flag(param: click.Parameter) -> str | None:
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else None


def _invoke(path, args, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSITE_CLIENT_HOME", str(tmp_path / "client-home"))
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OFFSITE_TOKEN", raising=False)
    monkeypatch.delenv("OFFSITE_SERVER", raising=False)
    head = DEAD_SERVER if path[0] == "offsite-admin" else []
    result = CliRunner().invoke(APPS[path[0]], [*head, *path[1:], *args], catch_exceptions=True)
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result, out


def _assert_clean_failure(result, out, what):
    assert result.exit_code in (1, 2), f"{what}: exit {result.exit_code}\n{out[-1500:]}"
    # An exception other than SystemExit means the command crashed (the user would see a traceback).
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{what}: crashed with {type(result.exception).__name__}: {result.exception}"
    )
    assert "Traceback" not in out, f"{what}: printed a traceback\n{out[-1500:]}"
    assert out.strip(), f"{what}: failed without saying why"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if "client-home" not in p.parts and "cache" not in p.parts
    }


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_unknown_option_is_a_usage_error(path, cmd, tmp_path, monkeypatch):
    result, out = _invoke(path, ["--no-such-option-xyz"], tmp_path, monkeypatch)
    _assert_clean_failure(result, out, "unknown option")
    assert result.exit_code == 2 and "No such option" in out


NUMERIC = [
    (p, c, prm)
    for p, c in COMMANDS
    for prm in c.params
    if isinstance(prm.type, (click.types.IntParamType, click.types.FloatParamType)) and _flag(prm)
]


@pytest.mark.parametrize("path,cmd,param", NUMERIC, ids=[f"{' '.join(p)} {_flag(prm)}" for p, _, prm in NUMERIC])
def test_a_word_where_a_number_belongs_is_a_usage_error(path, cmd, param, tmp_path, monkeypatch):
    result, out = _invoke(path, [_flag(param), "twelve"], tmp_path, monkeypatch)
    _assert_clean_failure(result, out, f"{_flag(param)} twelve")
    assert result.exit_code == 2 and "twelve" in out


def _filled_args(cmd: click.Command, path_value: str) -> list[str] | None:
    """Arguments for every required parameter (paths -> `path_value`, the rest -> "x") and
    every optional path; None when the command has neither (nothing to make bad)."""
    args: list[str] = []
    touched = False
    for prm in cmd.params:
        if prm.name in ("help", "json_out"):
            continue
        if isinstance(prm.type, click.types.BoolParamType) or getattr(prm, "is_flag", False):
            continue
        if not (prm.required or _is_path(prm)):
            continue
        value = path_value if _is_path(prm) else "x"
        touched = True
        if isinstance(prm, click.Argument):
            args += [value] * (prm.nargs if prm.nargs > 0 else 1)
        elif _flag(prm):
            args += [_flag(prm), value]
    return args if touched else None


FILE_CASES = [(p, c) for p, c in COMMANDS if p not in LONG_WITH_DEFAULTS and _filled_args(c, "f") is not None]


@pytest.mark.parametrize("kind", ["missing-or-unwritable", "wrong-kind-of-file"])
@pytest.mark.parametrize("path,cmd", FILE_CASES, ids=[" ".join(p) for p, _ in FILE_CASES])
def test_missing_unwritable_or_wrong_files_fail_cleanly_and_write_nothing(path, cmd, kind, tmp_path, monkeypatch):
    if kind == "wrong-kind-of-file" and path[-1] in WRITE_ONLY:
        pytest.skip("its only file is an output it writes whole: an existing file there is replaced, not read")
    blocker = tmp_path / "blocker"  # a regular file: nothing can be created beneath it
    blocker.write_bytes(b"not a directory")
    garbage = tmp_path / "garbage.bin"  # exists, but is no key, bundle, model, corpus or report
    garbage.write_bytes(os.urandom(2048))
    value = str(blocker / "missing") if kind == "missing-or-unwritable" else str(garbage)
    before = _snapshot(tmp_path)
    result, out = _invoke(path, _filled_args(cmd, value), tmp_path, monkeypatch)
    _assert_clean_failure(result, out, kind)
    if "cannot reach the server" in out:
        assert result.exit_code == 1  # it reached for the (dead) server: a failure, not a usage error
    assert _snapshot(tmp_path) == before, "the failed command left files behind or changed its inputs"


def test_the_installed_script_prints_one_error_line(tmp_path):
    """The same through the real entry point (a subprocess), as a user sees it."""
    import subprocess
    import sys

    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.server.cli.main",
            "backup",
            "--data-dir",
            str(blocker / "d"),
            "--out",
            str(blocker / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "blocker" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == [blocker]
