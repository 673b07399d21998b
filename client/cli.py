"""`offsite-client`: the data owner's command line (enroll, fetch, train, join).

Each command lives in its own module and is mounted here.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="offsite-client",
    help="Offsite data-owner tools: verify a bundle, train its adapter on your own data, join a federation.\n\n"
    "Example: offsite-client train --bundle bundle --public-key signing.pub --data my.jsonl --out adapter.safetensors",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Offsite data-owner tools."""


from . import cli_enroll  # noqa: E402

app.command("enroll")(cli_enroll.enroll)
app.command("fetch")(cli_enroll.fetch)
from . import cli_train  # noqa: E402

app.command("train")(cli_train.train)
app.command("join")(__import__("offsite.client.cli_join", fromlist=["join"]).join)  # federation: run a SuperNode

if __name__ == "__main__":
    app()
