"""Write docs/cli.md from the typer apps themselves, so the reference cannot drift from the code.

    python -m offsite.cli_docs            # rewrite docs/cli.md
    python -m offsite.cli_docs --check    # exit 1 when docs/cli.md is stale (what the test runs)

Hidden commands (the previous release's spellings) are left out; `walk` also gives the docs
test every visible command path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import typer

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def clis() -> list[tuple[str, click.Command]]:
    from offsite.client.cli import app as client_app
    from offsite.server.cli.main import app as admin_app

    return [
        ("offsite-admin", typer.main.get_command(admin_app)),
        ("offsite-client", typer.main.get_command(client_app)),
    ]


def walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every visible command under `cmd`, depth first, in the order `--help` lists them."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path[-1])
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, (*path, name))


def _option_rows(cmd: click.Command, ctx: click.Context) -> list[str]:
    rows = []
    for p in cmd.get_params(ctx):
        if (
            getattr(p, "hidden", False)
            or p.name in ("install_completion", "show_completion", "help")
            or "--help" in getattr(p, "opts", ())
        ):
            continue
        if isinstance(p, click.Argument):
            names, kind = p.human_readable_name, "argument"
        else:
            names = ", ".join(p.opts + p.secondary_opts)
            kind = "flag" if p.is_flag else (p.type.name.upper() if p.type else "")
        help_text = " ".join((getattr(p, "help", None) or "").split())
        extra = []
        if getattr(p, "envvar", None):
            extra.append(f"env {p.envvar}")
        if p.required:
            extra.append("required")
        elif p.default not in (None, False, (), [], "") and not callable(p.default) and kind != "flag":
            # the same file on every machine: a home-relative default is shown as ~
            extra.append("default " + str(p.default).replace(str(Path.home()), "~"))
        cell = help_text + (f" ({'; '.join(extra)})" if extra else "")
        cell = cell.replace("|", "\\|")
        rows.append(f"| `{names}` | {kind} | {cell} |")
    return rows


def render() -> str:
    out = [
        "# Command-line reference",
        "",
        "Generated from the typer apps by `python -m offsite.cli_docs` (`make docs`); a test fails when",
        "this file and the code disagree, so edit the commands' help, not this file.",
        "",
    ]
    from offsite.server.cli.main import RENAMED

    out += [
        "Renamed in this release; the old spellings still work (hidden, with a note) until the next one:",
        "",
        "| old | new |",
        "|---|---|",
        *[f"| `offsite-admin {o}` | `offsite-admin {n}` |" for o, n in RENAMED.items()],
        "",
    ]
    for prog, root in clis():
        for path, cmd in walk(root, (prog,)):
            ctx = click.Context(cmd, info_name=" ".join(path))
            depth = min(len(path) + 1, 4)
            out += [f"{'#' * depth} `{' '.join(path)}`", ""]
            doc = (cmd.help or "").strip()
            if doc:
                out += [" ".join(line.split()) if line.strip() else "" for line in doc.replace("\b", "").splitlines()]
                out.append("")
            out += ["```", f"{' '.join(path)} {' '.join(cmd.collect_usage_pieces(ctx))}".rstrip(), "```", ""]
            rows = _option_rows(cmd, ctx)
            if rows:
                out += ["| option | type | what |", "|---|---|---|", *rows, ""]
            if isinstance(cmd, click.Group):
                subs = [(n, cmd.get_command(ctx, n)) for n in cmd.list_commands(ctx)]
                subs = [(n, c) for n, c in subs if c is not None and not c.hidden]
                if subs:
                    out += [f"- `{n}`: {c.get_short_help_str(limit=100)}" for n, c in subs]
                    out.append("")
    while out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from the code")
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `python -m offsite.cli_docs`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
