"""The Flower app that `flwr run` starts on a local simulation SuperLink (see local_simulation).

The ServerApp reads the job from the run config, as a deployed one does. Simulated
SuperNodes have no node config beyond their partition id, so the data owners' settings
travel in the run config too (`client-data`, `client-bundle-cache`, `client-public-key`,
`client-threads`); `{partition}` in `client-data` becomes each virtual owner's index.
"""

from __future__ import annotations

from dataclasses import fields

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from offsite.client.flower_app import ClientSettings, train_handler

from .config import FederationConfig
from .server_app import FederatedJob

CLIENT_PREFIX = "client-"


def client_run_config(settings: ClientSettings) -> dict[str, str | int]:
    """The ClientApp's settings as run-config entries (`client-bundle-cache`, ...)."""
    return {CLIENT_PREFIX + f.name.replace("_", "-"): getattr(settings, f.name) for f in fields(ClientSettings)}


def client_settings(run_config: dict) -> ClientSettings:
    values = {}
    for f in fields(ClientSettings):
        key = CLIENT_PREFIX + f.name.replace("_", "-")
        if key in run_config:
            values[f.name] = type(getattr(ClientSettings(), f.name))(run_config[key])
    return ClientSettings(**values)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, ctx: Context) -> Message:
    return train_handler(msg, ctx, client_settings(dict(ctx.run_config)))


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    # Results go to job.json and the registry; the submitter follows job.json.
    FederatedJob(FederationConfig.from_run_config(dict(context.run_config)), "simulation").run(grid, context)
