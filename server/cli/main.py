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

if __name__ == "__main__":
    app()
