"""The docs stay true to the code: docs/cli.md is what the typer apps generate, and every
`offsite-admin` / `offsite-client` command shown in a fenced block of the README or docs/
names a real command (its `--help` succeeds) with options that command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offsite import api_docs, cli_docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = {ROOT / "docs" / "cli.md", ROOT / "docs" / "partner-api.md"}


def test_cli_reference_is_generated_from_the_code():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs.render(), (
        "docs/cli.md is stale: run `python -m offsite.cli_docs` (or `make docs`) and commit it"
    )


def test_partner_api_is_generated_from_the_protos():
    assert (ROOT / "docs" / "partner-api.md").read_text() == api_docs.render(), (
        "docs/partner-api.md is stale: run `python -m offsite.api_docs` (or `make docs`) and commit it"
    )


def test_every_service_has_a_checked_example():
    services = {name for p in api_docs.PROTO_DIR.glob("*.proto") for name in api_docs.parse(p).services}
    assert services == set(api_docs.EXAMPLES)


def test_docs_stand_alone():
    for page in PAGES:
        assert "../shared" not in page.read_text(), f"{page.name} links outside the repository"


def shown_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line number, words) of every CLI invocation in the page's fenced code blocks."""
    found, fenced, pending, start = [], False, "", 0
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        text = (pending + " " + line.strip()) if pending else line.strip()
        start = start if pending else n
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        text = re.sub(r"\s#.*$", "", text).removeprefix("$ ")
        for part in re.split(r"\s*(?:&&|;|\|\|)\s*", text):
            part = re.sub(r"^(?:\w+=\S+\s+)+", "", part.strip())  # VAR=value prefixes
            if part.startswith(("offsite-admin ", "offsite-client ")):
                found.append((start, shlex.split(part.split(" | ")[0].replace("$(", "(").replace("...", "x"))))
    return found


def _resolve(words: list[str]) -> tuple[list[str], click.Command, list[str]]:
    roots = dict(cli_docs.clis())
    cmd, path, i = roots[words[0]], [words[0]], 1
    while isinstance(cmd, click.Group) and i < len(words):
        w = words[i]
        if w.startswith("-"):  # a global option before the subcommand, with its value
            opt = next((p for p in cmd.params if w.split("=")[0] in getattr(p, "opts", [])), None)
            assert opt is not None, f"{' '.join(path)} has no option {w}"
            i += 1 if ("=" in w or getattr(opt, "is_flag", False)) else 2
            continue
        sub = cmd.get_command(click.Context(cmd), w)
        if sub is None or sub.hidden:
            break
        cmd, path, i = sub, [*path, w], i + 1
    return path, cmd, words[i:]


CASES = [(page, n, words) for page in PAGES if page not in GENERATED for n, words in shown_commands(page)]


def test_the_docs_show_commands():
    assert len(CASES) >= 20  # the parser found the README's and the guides' commands


@pytest.mark.parametrize("page, line, words", CASES, ids=[f"{p.name}:{n}" for p, n, _ in CASES])
def test_every_command_shown_in_the_docs_parses(page, line, words):
    path, cmd, rest = _resolve(words)
    where = f"{page.name}:{line}: `{' '.join(words)}`"
    assert not isinstance(cmd, click.Group) or not rest or rest[0].startswith("-"), (
        f"{where}: {' '.join(path)} has no command {rest[0]!r}"
    )
    names = {o for p in cmd.params for o in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))}
    for w in rest:
        if w.startswith("--") and w != "--help":
            assert w.split("=")[0] in names, f"{where}: {' '.join(path)} has no option {w.split('=')[0]}"
    app = dict(cli_docs.clis())[path[0]]
    r = CliRunner().invoke(app, [*path[1:], "--help"])
    assert r.exit_code == 0, f"{where}: `{' '.join(path)} --help` failed: {r.output}"


def test_every_benchmark_section_names_its_command_machine_state_and_date():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) >= 5
    for section in sections:
        title = section.splitlines()[0]
        low = section.lower()
        assert "python -m bench." in section or "offsite-admin " in section, f"{title}: no command that reproduces it"
        assert "machine state" in low or "load average" in low, f"{title}: no machine state"
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", section), f"{title}: no date"


def test_relative_links_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"
