"""`offsite-admin jobs local ...`: run a federated job on this machine (simulation) or a SuperLink.

(`offsite-admin jobs ...` drives jobs on a running gRPC server; this `local` subgroup is the
one-machine path: registry, artifacts and job state under --data-dir.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offsite.cli import JsonOption, err_console, fail, json_option

app = typer.Typer(
    no_args_is_help=True, help="Run federated jobs: Flower simulation on this machine, or a deployed SuperLink."
)


@app.callback()
def _job() -> None:
    """Run federated jobs with Flower."""


def _print_job(job: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(job, indent=2, default=str))
        return
    t = Table(title=f"job {job['id']} ({job.get('engine', '')}): {job['status']}")
    for col in (
        "round",
        "clients",
        "dropped",
        "plug-in ppl",
        "client eval ppl",
        "MB down/up",
        "round s",
        "server share",
    ):
        t.add_column(col)
    for r in job.get("rounds", []):
        ppls = [c["eval_ppl_after"] for c in r["clients"] if c.get("eval_ppl_after") is not None]
        t.add_row(
            str(r["round"]),
            str(len(r["clients"])),
            str(len(r.get("dropped", []))),
            f"{r['plugin_ppl']:.3f}" if r.get("plugin_ppl") is not None else "-",
            f"{sum(ppls) / len(ppls):.3f}" if ppls else "-",
            f"{r['bytes_down'] / 1e6:.2f}/{r['bytes_up'] / 1e6:.2f}",
            f"{r['round_seconds']:.1f}",
            f"{100 * r.get('server_overhead_share', 0):.1f}%",
        )
    err_console.print(t)
    if job.get("plugin_ppl_initial") is not None:
        err_console.print(f"plug-in ppl before training: {job['plugin_ppl_initial']:.3f}")
    if job.get("privacy"):
        err_console.print(f"DP: epsilon {job['privacy']['epsilon']:.3f} at delta {job['privacy']['delta']}")
    rel = job.get("release")
    if rel:
        err_console.print(
            f"candidate release {rel['id']}: status [bold]{rel['status']}[/bold], model {rel['model_dir']}"
        )


def _run(job_obj, json_out: bool, engine: str, workers: int, superlink: str, flwr_home: str, app_dir: str) -> dict:
    from offsite.server.federation.job_runner import run_simulation_job

    if not json_out:
        err_console.print(
            f"job {job_obj.cfg.job_id}: {job_obj.clients} data owners, {job_obj.cfg.rounds} rounds ({engine})"
        )
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_out,
    ) as bar:
        task = bar.add_task("rounds", total=job_obj.cfg.rounds)

        def on_round(record: dict) -> None:
            ppl = record.get("plugin_ppl")
            bar.update(
                task,
                completed=record["round"],
                description=f"round {record['round']}: {len(record['clients'])} clients"
                + (f", plug-in ppl {ppl:.2f}" if ppl else ""),
            )

        if engine == "simulation":
            return run_simulation_job(job_obj, workers=workers or None, on_round=on_round)
        from offsite.server.federation.deployment import submit_run

        return submit_run(job_obj.cfg, app_dir, superlink, flwr_home, wait=True, on_round=on_round)


@app.command("run")
def run(
    engine: str = typer.Option(
        "simulation",
        "--engine",
        help="simulation (Flower Simulation Engine, this machine) | deployment (flwr run to a SuperLink)",
    ),
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        help="base model: smollm2-135m, tiny-llama|tiny-gpt2|tiny-opt, or a HF model directory",
    ),
    clients: int = typer.Option(
        3, "--clients", help="data owners (simulation: virtual clients, one corpus shard each)"
    ),
    rounds: int = typer.Option(3, "--rounds"),
    corpus: str = typer.Option(
        "python-reference",
        "--corpus",
        help="python-reference, or a JSONL/text file or directory split into --clients shards",
    ),
    data_dir: Path = typer.Option(
        ..., "--data-dir", help="registry, artifacts, bundles and job state (the server's data dir works)"
    ),
    bundle: str = typer.Option(
        "", "--bundle", help="an existing bundle directory (default: build one for --model, reused across jobs)"
    ),
    public_key: str = typer.Option("", "--public-key", help="signing.pub of --bundle"),
    quantize: str = typer.Option(
        "none", "--quantize", help="when building: middle-block weights none|int8|int4|int3|int2"
    ),
    local_steps: int = typer.Option(10, "--local-steps", help="training steps per client per round"),
    lr: float = typer.Option(1e-4, "--lr"),
    batch_size: int = typer.Option(4, "--batch-size"),
    block_size: int = typer.Option(256, "--block-size"),
    scheme: str = typer.Option("full", "--scheme", help="sparse-update scheme of the client engine"),
    min_clients: int = typer.Option(
        0, "--min-clients", help="fewer successful replies fail the round (default: min(2, clients))"
    ),
    fraction: float = typer.Option(1.0, "--fraction", help="share of data owners sampled per round"),
    round_timeout: float = typer.Option(600.0, "--round-timeout", help="seconds to wait for replies in a round"),
    norm_bound: float = typer.Option(0.0, "--norm-bound", help="max L2 norm of one client's update (0: off)"),
    dp_noise: float = typer.Option(
        0.0, "--dp-noise", help="DP noise multiplier (>0 turns on client-side clipping + Gaussian noise)"
    ),
    dp_clip: float = typer.Option(0.1, "--dp-clip", help="DP clipping norm of one client's update"),
    dp_delta: float = typer.Option(1e-5, "--dp-delta"),
    secagg: bool = typer.Option(False, "--secagg", help="SecAgg+ (the server sees only the sum of updates)"),
    heldout_limit: int = typer.Option(
        0, "--heldout-limit", help="at most this many held-out blocks for plug-in ppl (0: all)"
    ),
    workers: int = typer.Option(0, "--workers", help="simulation: clients trained in parallel (default: min(2, CPUs))"),
    superlink: str = typer.Option(
        "offsite", "--superlink", help="deployment: SuperLink connection name in FLWR_HOME/config.toml"
    ),
    flwr_home: str = typer.Option(
        "", "--flwr-home", help="deployment: the FLWR_HOME that deploy/local wrote (default DATA_DIR/flwr-home)"
    ),
    app_dir: str = typer.Option(
        "", "--app-dir", help="deployment: the Flower app directory (default DATA_DIR/flower-app, generated)"
    ),
    json_out: bool = json_option("print the job (rounds with clients and plugin_ppl, release with status) as JSON"),
) -> None:
    """Run a federated job end to end: rounds, per-round metrics, a candidate release (pending-gate).

    Example: offsite-admin jobs local run --engine simulation --model tiny-llama --clients 3 --rounds 2 --data-dir state --json
    """
    from offsite.server.federation.config import FederationConfigError
    from offsite.server.federation.job_runner import JobSetupError, prepare_local_job, quiet_flower

    quiet_flower()
    if engine not in ("simulation", "deployment"):
        fail(f"--engine {engine!r}: choose simulation or deployment", json_out)
    options = dict(
        local_steps=local_steps,
        lr=lr,
        batch_size=batch_size,
        block_size=block_size,
        scheme=scheme,
        fraction=fraction,
        round_timeout=round_timeout,
        norm_bound=norm_bound,
        secagg=secagg,
        heldout_limit=heldout_limit,
        min_clients=min_clients or min(2, clients),
    )
    if dp_noise > 0:
        options.update(dp_noise_multiplier=dp_noise, dp_clipping_norm=dp_clip, dp_delta=dp_delta, dp_population=clients)
    build = {"quantize": quantize, "block_size": block_size}
    try:
        job_obj = prepare_local_job(
            data_dir,
            model,
            clients,
            rounds,
            corpus=corpus,
            bundle=bundle or None,
            public_key=public_key or None,
            build=build,
            engine=engine,
            progress=not json_out,
            **options,
        )
        if engine == "deployment":
            app_dir = app_dir or str(Path(data_dir).resolve() / "flower-app")
            flwr_home = flwr_home or str(Path(data_dir).resolve() / "flwr-home")
        if json_out:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        job = _run(job_obj, json_out, engine, workers, superlink, flwr_home, app_dir)
    except (JobSetupError, FederationConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e), json_out)
    _print_job(job, json_out)
    if job.get("status") != "completed":
        raise typer.Exit(1)


@app.command("resume")
def resume(
    job_id: str = typer.Argument(..., help="the job id that `jobs local run` printed"),
    data_dir: Path = typer.Option(..., "--data-dir"),
    workers: int = typer.Option(0, "--workers"),
    json_out: bool = JsonOption,
) -> None:
    """Continue a simulation job from its last completed round (after a crash or restart).

    Example: offsite-admin jobs local resume job_1a2b3c4d5e6f --data-dir state
    """
    from offsite.server.federation.job_runner import JobSetupError, load_local_job, quiet_flower

    quiet_flower()
    try:
        job_obj = load_local_job(data_dir, job_id)
        job = _run(job_obj, json_out, "simulation", workers, "", "", "")
    except JobSetupError as e:
        fail(str(e), json_out)
    _print_job(job, json_out)


@app.command("show")
def show(
    job_id: str = typer.Argument(...),
    data_dir: Path = typer.Option(..., "--data-dir"),
    json_out: bool = JsonOption,
) -> None:
    """Show a job's rounds and release as recorded in its job directory.

    Example: offsite-admin jobs local show job_1a2b3c4d5e6f --data-dir state --json
    """
    from offsite.server.federation.job_runner import JobSetupError, read_job

    try:
        job = read_job(Path(data_dir).resolve() / "work" / job_id)
    except JobSetupError as e:
        fail(str(e), json_out)
    _print_job(job, json_out)
