"""Server hooks other teams plug into: background tasks (the eval scheduler) and model
directories under DATA_DIR/models."""

from __future__ import annotations

import asyncio
import threading

import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import models_pb2, models_pb2_grpc
from offsite.server.app import ServerThread
from offsite.server.state import ServerConfig

pytestmark = pytest.mark.e2e

STARTED, CANCELLED = threading.Event(), threading.Event()


async def scheduler_like(state) -> None:
    assert state.registry.due_eval_schedules() == []
    STARTED.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        CANCELLED.set()
        raise


def test_background_task_runs_and_is_cancelled_at_shutdown(tmp_path):
    cfg = ServerConfig(
        data_dir=tmp_path / "srv", port=0, background_tasks=[scheduler_like, "offsite.no_such_module:run"]
    )  # missing one is skipped
    with ServerThread(cfg):
        assert STARTED.wait(10)
    assert CANCELLED.is_set()


def test_register_a_model_directory_under_data_dir(tmp_path):
    from offsite.emulators.models import load_model

    data_dir = tmp_path / "srv"
    loaded = load_model("tiny-gpt2")
    target = data_dir / "models" / "my-gpt2"
    loaded.model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    with ServerThread(ServerConfig(data_dir=data_dir, port=0)) as server:
        stub = models_pb2_grpc.ModelsStub(open_channel(server.address, server.admin_token))
        m = stub.RegisterModel(models_pb2.RegisterModelRequest(name="mine", source="my-gpt2"))
        assert m.family == "gpt2" and m.digest == loaded.digest and m.source == str(target.resolve())
        # The stored absolute location resolves again (builds and exports use it) ...
        assert server.server.state.resolve_model_source(m.source) == str(target.resolve())
        # ... but no other absolute path does.
        with pytest.raises(ValueError):
            server.server.state.resolve_model_source(str(tmp_path))
