"""The shape of both CLIs: one group per noun, `local` subgroups, hidden aliases for the
previous release's spellings, and one failure format (`error: ...` / `{"ok": false}`)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from offsite.client.cli import app as client_app
from offsite.server.cli.main import app

runner = CliRunner()


def test_top_level_lists_each_noun_once_and_hides_the_old_spellings():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    listed = set(re.findall(r"^│ (\w+) ", r.stdout, re.M))
    for noun in (
        "keys",
        "plugin",
        "demo",
        "serve",
        "models",
        "emulators",
        "jobs",
        "releases",
        "evals",
        "ops",
        "artifacts",
        "tokens",
        "audit",
        "whoami",
    ):
        assert noun in listed, noun
    assert not listed & {"emulator", "bundles", "eval", "job"}


@pytest.mark.parametrize("group, local_command", [("emulators", "build"), ("evals", "run"), ("jobs", "run")])
def test_each_noun_with_local_work_has_a_local_subgroup(group, local_command):
    r = runner.invoke(app, [group, "local", local_command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example:" in r.stdout


def test_schedule_lives_only_under_server_evals():
    assert runner.invoke(app, ["evals", "schedule", "--help"]).exit_code == 0
    assert runner.invoke(app, ["evals", "local", "schedule", "--help"]).exit_code != 0


@pytest.mark.parametrize(
    "old, new",
    [
        (["emulator", "build"], ["emulators", "local", "build"]),
        (["bundles", "build"], ["emulators", "build"]),
        (["eval", "gate"], ["evals", "local", "gate"]),
        (["eval", "schedule", "create"], ["evals", "schedule", "create"]),
        (["job", "resume"], ["jobs", "local", "resume"]),
    ],
)
def test_old_spellings_are_hidden_aliases_of_the_new_commands(old, new):
    a = runner.invoke(app, [*old, "--help"])
    b = runner.invoke(app, [*new, "--help"])
    assert a.exit_code == 0 and b.exit_code == 0
    # same options, same docs: the alias runs the very same command
    assert a.stdout.split("Options")[1] == b.stdout.split("Options")[1]


def test_an_old_spelling_runs_and_says_where_it_moved():
    r = runner.invoke(app, ["eval", "suites", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)  # stdout stays parseable
    assert "evals local" in r.stderr


def test_failures_have_one_format_in_both_clis(tmp_path):
    missing = tmp_path / "nope"
    r = runner.invoke(app, ["emulators", "local", "verify", str(missing), "--public-key", str(missing), "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"ok": False, "error": json.loads(r.stdout)["error"]}
    r = runner.invoke(app, ["emulators", "local", "verify", str(missing), "--public-key", str(missing)])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and r.stdout == ""
    r = runner.invoke(
        client_app,
        ["fetch", "--job", "job_000000000000", "--json"],
        env={"OFFSITE_CLIENT_HOME": str(tmp_path / "home")},
    )
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False


def test_an_error_quoting_brackets_prints_them(tmp_path):
    odd = tmp_path / "[red]bundle"
    r = runner.invoke(app, ["emulators", "local", "verify", str(odd), "--public-key", str(tmp_path / "k")])
    assert r.exit_code == 1 and "[red]bundle" in r.stderr, r.stderr


def test_help_loads_no_heavy_library():
    """`--help` of both CLIs stays fast: torch, transformers and Flower load inside the commands."""
    import subprocess
    import sys

    code = (
        "import sys, offsite.server.cli.main, offsite.client.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'flwr', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
