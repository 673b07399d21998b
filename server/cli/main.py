"""`offsite-admin`: the model owner's command line, grouped by what a model owner does.

One group per noun. A group's own commands talk to a server over gRPC (the groups are the
`offsite.v1` services: models, emulators, jobs, releases, evals, ops, artifacts, tokens);
where the same work also runs on this machine without a server, it sits under the group's
`local` subgroup (`emulators local build`, `evals local run`, `jobs local run`). Commands with
no server counterpart (keys, plugin, demo, serve) are top-level.

Every command module imports typer, rich and the gRPC stubs at the top and loads torch,
transformers and Flower inside the command that needs them, so `--help` stays fast.

The spellings of the previous release stay as hidden aliases (`emulator`, `bundles`, `eval`,
`job`) that print where the command moved; they go in the next release.
"""

from __future__ import annotations

import typer

from offsite.cli import OffsiteGroup, err_console

from . import (
    backup,
    demo,
    emulator,
    eval_server,
    evals,
    job,
    jobs,
    keys,
    models,
    ops,
    plugin,
    releases,
    remote,
    serve,
    tokens,
)

LOCAL = "On this machine"
SERVER = "Against a server (--server, --token)"
RUN_SERVER = "Run the server"

app = typer.Typer(
    name="offsite-admin",
    help="Offsite model-owner tools: keys, emulator bundles, plug-in, jobs, releases, safety evals, the server.\n\n"
    "Example: offsite-admin keys init --dir keys && "
    "offsite-admin emulators local build --model smollm2-135m --signing-key keys/signing.key --out bundle",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OffsiteGroup,  # a stray OSError or UnicodeDecodeError: one error line, not a traceback
)
app.callback()(remote.global_options)

# this machine
app.add_typer(keys.app, name="keys", rich_help_panel=LOCAL)
app.command("plugin", rich_help_panel=LOCAL)(plugin.plugin)
app.command("demo", rich_help_panel=LOCAL)(demo.demo)

# the server itself
app.command("serve", rich_help_panel=RUN_SERVER)(serve.serve)
app.command("backup", rich_help_panel=RUN_SERVER)(backup.backup)
app.command("restore", rich_help_panel=RUN_SERVER)(backup.restore)

# nouns, over gRPC; each `local` subgroup does the same work here, without a server
models.emulators_app.add_typer(emulator.app, name="local", rich_help_panel=LOCAL)
eval_server.app.add_typer(evals.app, name="local", rich_help_panel=LOCAL)
jobs.app.add_typer(job.app, name="local", rich_help_panel=LOCAL)

app.add_typer(models.app, name="models", rich_help_panel=SERVER)
app.add_typer(models.emulators_app, name="emulators", rich_help_panel=SERVER)
app.add_typer(jobs.app, name="jobs", rich_help_panel=SERVER)
app.add_typer(releases.app, name="releases", rich_help_panel=SERVER)
app.add_typer(eval_server.app, name="evals", rich_help_panel=SERVER)
app.add_typer(ops.app, name="ops", rich_help_panel=SERVER)
app.add_typer(ops.artifacts_app, name="artifacts", rich_help_panel=SERVER)
app.add_typer(tokens.app, name="tokens", rich_help_panel=SERVER)
app.command("audit", rich_help_panel=SERVER)(tokens.audit)
app.command("whoami", rich_help_panel=SERVER)(tokens.whoami)


RENAMED: dict[str, str] = {}  # old spelling -> new one (docs/cli.md lists them)


def _legacy(old: str, new: str, source: typer.Typer, *extra: tuple[str, typer.Typer]) -> None:
    """Mount `source`'s commands under the old name, hidden, with a note on stderr naming the new one."""
    alias = typer.Typer(no_args_is_help=True, help=f"Renamed: use `offsite-admin {new}`.")

    @alias.callback()
    def _moved() -> None:
        err_console.print(
            f"[yellow]note:[/yellow] `offsite-admin {old}` is now `offsite-admin {new}`; "
            "the old name goes in the next release",
            highlight=False,
        )

    alias.registered_commands = list(source.registered_commands)
    alias.registered_groups = [g for g in source.registered_groups if g.name != "local"]
    for name, group in extra:
        alias.add_typer(group, name=name)
    app.add_typer(alias, name=old, hidden=True)
    RENAMED[old] = new


_legacy("emulator", "emulators local", emulator.app)
_legacy("bundles", "emulators", models.emulators_app)
_legacy("eval", "evals local", evals.app, ("schedule", eval_server.schedule_app))
_legacy("job", "jobs local", job.app)

if __name__ == "__main__":
    app()
