"""`offsite-admin models ...` and `offsite-admin emulators ...`: base models and the emulator
bundles the server builds from them (`offsite-admin emulators local build` builds one here)."""

from __future__ import annotations

from pathlib import Path

import typer

from offsite.cli import int_list
from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, models_pb2, models_pb2_grpc

from .remote import (
    CONNECTION,
    JsonOption,
    call,
    emit_json,
    fail,
    finish_operation,
    fmt_time,
    show_message,
    table,
    to_dict,
)

app = typer.Typer(no_args_is_help=True, help="Register and list base models on the server.")
emulators_app = typer.Typer(
    no_args_is_help=True,
    help="Emulator bundles: build, upload and list them on the server; `local` builds, verifies and inspects them here.",
)


def _models() -> models_pb2_grpc.ModelsStub:
    return models_pb2_grpc.ModelsStub(CONNECTION.channel())


def _emulators() -> models_pb2_grpc.EmulatorsStub:
    return models_pb2_grpc.EmulatorsStub(CONNECTION.channel())


@app.command("register")
def register(
    name: str = typer.Argument(..., help="a unique name, e.g. smollm2"),
    source: str = typer.Option(
        "",
        "--source",
        help="built-in model (smollm2-135m, tiny-llama, ...) or a directory "
        "name under the server's DATA_DIR/models; default: NAME",
    ),
    description: str = typer.Option("", "--description"),
    json_out: bool = JsonOption,
) -> None:
    """Register a base model (the server loads it once to record its family, size and digest).

    Example: offsite-admin models register smollm2 --source smollm2-135m
    """
    resp = call(
        _models().RegisterModel,
        models_pb2.RegisterModelRequest(name=name, source=source, description=description),
        json_out=json_out,
    )
    show_message(f"model {resp.id}", resp, json_out)


@app.command("list")
def list_(limit: int = typer.Option(0, "--limit"), json_out: bool = JsonOption) -> None:
    """List registered models.

    Example: offsite-admin models list --json
    """
    resp = call(_models().ListModels, models_pb2.ListModelsRequest(limit=limit), json_out=json_out)
    if json_out:
        emit_json([to_dict(m) for m in resp.models])
        return
    table(
        "models",
        ["id", "name", "source", "family", "layers", "digest", "created"],
        [(m.id, m.name, m.source, m.family, m.num_layers, m.digest[:12], fmt_time(m.created_at)) for m in resp.models],
    )


@app.command("get")
def get(model: str = typer.Argument(..., help="model id or name"), json_out: bool = JsonOption) -> None:
    """Show one model.

    Example: offsite-admin models get smollm2
    """
    show_message("model", call(_models().GetModel, models_pb2.GetModelRequest(id=model), json_out=json_out), json_out)


@emulators_app.command("build")
def build(
    model: str = typer.Option(..., "--model", help="registered model id or name"),
    adapter_layers: str = typer.Option("", "--adapter-layers", help="bottom,top adapter blocks (default 2,2)"),
    emulator_layers: int = typer.Option(0, "--emulator-layers", help="middle blocks to keep (0 = all)"),
    distill_steps: int = typer.Option(0, "--distill-steps"),
    quantize: str = typer.Option("", "--quantize", help="none | int8 | int4 | int3 | int2"),
    awq: bool = typer.Option(False, "--awq", help="activation-aware scaling for low-bit weights"),
    block_size: int = typer.Option(0, "--block-size"),
    seed: int = typer.Option(0, "--seed"),
    kept: str = typer.Option("", "--kept", help="explicit original middle block indices to keep, e.g. 3,7,11"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the build to its end"),
    json_out: bool = JsonOption,
) -> None:
    """Build and sign an emulator bundle on the server (an operation).

    Example: offsite-admin emulators build --model smollm2 --quantize int4
    """
    cfg = models_pb2.EmulatorBuildConfig(
        adapter_layers=int_list(adapter_layers, "--adapter-layers"),
        emulator_layers=emulator_layers,
        distill_steps=distill_steps,
        quantize=quantize,
        awq=awq,
        block_size=block_size,
        seed=seed,
        kept=int_list(kept, "--kept"),
    )
    op = call(_emulators().BuildEmulator, models_pb2.BuildEmulatorRequest(model=model, config=cfg), json_out=json_out)
    finish_operation(op, wait, json_out)


@emulators_app.command("upload")
def upload(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="a bundle .tar signed with the server's key"),
    model: str = typer.Option(..., "--model", help="the registered model it was built from"),
    json_out: bool = JsonOption,
) -> None:
    """Upload a bundle built elsewhere; the server verifies its signature before registering it.

    Example: offsite-admin emulators upload bundle.tar --model smollm2
    """
    size = path.stat().st_size

    def chunks():
        yield artifacts_pb2.UploadRequest(kind="bundle", name=path.name)
        with open(path, "rb") as fh:
            while data := fh.read(1 << 20):
                yield artifacts_pb2.UploadRequest(data=data)

    ref = call(artifacts_pb2_grpc.ArtifactsStub(CONNECTION.channel()).Upload, chunks(), json_out=json_out)
    if ref.size != size:
        fail(f"the server stored {ref.size} bytes of {size}; upload again", json_out, code=1)
    resp = call(
        _emulators().RegisterEmulator,
        models_pb2.RegisterEmulatorRequest(model=model, bundle_sha256=ref.sha256),
        json_out=json_out,
    )
    show_message(f"emulator {resp.id}", resp, json_out)


@emulators_app.command("list")
def bundles_list(
    model: str = typer.Option("", "--model"), limit: int = typer.Option(0, "--limit"), json_out: bool = JsonOption
) -> None:
    """List emulator bundles.

    Example: offsite-admin emulators list --model smollm2
    """
    resp = call(
        _emulators().ListEmulators, models_pb2.ListEmulatorsRequest(model=model, limit=limit), json_out=json_out
    )
    if json_out:
        emit_json([to_dict(e) for e in resp.emulators])
        return
    table(
        "emulator bundles",
        ["id", "model", "bundle sha256", "size", "quantize", "created"],
        [
            (e.id, e.model_id, e.bundle.sha256[:16], e.bundle.size, e.config.quantize or "none", fmt_time(e.created_at))
            for e in resp.emulators
        ],
    )


@emulators_app.command("get")
def bundles_get(emulator_id: str = typer.Argument(...), json_out: bool = JsonOption) -> None:
    """Show one emulator bundle (with its manifest).

    Example: offsite-admin emulators get emu_1a2b3c4d5e6f --json
    """
    resp = call(_emulators().GetEmulator, models_pb2.GetEmulatorRequest(id=emulator_id), json_out=json_out)
    show_message(f"emulator {resp.id}", resp, json_out)
