"""`offsite-client`: the data owner's command line (enroll, fetch, train, join).

Each command lives in its own module and is mounted here. The modules import only typer,
rich and the client's fetch code at the top; torch and the engine load inside `train`, so
`--help`, `enroll` and `fetch` start in a fraction of a second and stay small in memory.
"""

from __future__ import annotations

import typer

from offsite.cli import OffsiteGroup

from . import cli_enroll, cli_join, cli_train

app = typer.Typer(
    name="offsite-client",
    help="Offsite data-owner tools: verify a bundle, train its adapter on your own data, join a federation.\n\n"
    "Example: offsite-client train --bundle bundle --public-key signing.pub --data my.jsonl --out adapter.safetensors",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OffsiteGroup,  # a stray OSError or UnicodeDecodeError: one error line, not a traceback
)


@app.callback()
def _root() -> None:
    """Offsite data-owner tools."""


app.command("enroll")(cli_enroll.enroll)
app.command("fetch")(cli_enroll.fetch)
app.command("train")(cli_train.train)
app.command("join")(cli_join.join)  # a SuperNode of a deployed federation

if __name__ == "__main__":
    app()
