"""`offsite-admin`: the model owner's command line.

Each command group lives in its own module of this package and is mounted here.
"""

from __future__ import annotations

import typer

from . import demo, emulator, evals, keys, plugin

app = typer.Typer(
    name="offsite-admin",
    help="Offsite model-owner tools: keys, emulator bundles, plug-in, server, jobs, releases, evals.\n\n"
    "Example: offsite-admin keys init --dir keys && "
    "offsite-admin emulator build --model smollm2-135m --signing-key keys/signing.key --out bundle",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

app.add_typer(keys.app, name="keys")
app.add_typer(emulator.app, name="emulator")
app.command("plugin")(plugin.plugin)
app.add_typer(evals.app, name="eval")
app.command("demo")(demo.demo)

# server: global connection options, then the gRPC-backed command groups
from . import eval_server, jobs, models, ops, releases, remote, serve, tokens  # noqa: E402

app.callback()(remote.global_options)
app.command("serve")(serve.serve)
app.add_typer(tokens.app, name="tokens")
app.command("audit")(tokens.audit)
app.command("whoami")(tokens.whoami)
app.add_typer(models.app, name="models")
app.add_typer(models.bundles_app, name="bundles")
app.add_typer(jobs.app, name="jobs")
app.add_typer(releases.app, name="releases")
app.add_typer(eval_server.app, name="evals")
app.add_typer(ops.app, name="ops")
app.add_typer(ops.artifacts_app, name="artifacts")
app.add_typer(__import__("offsite.server.cli.job", fromlist=["app"]).app, name="job")  # federation: one-machine jobs

if __name__ == "__main__":
    app()
