"""A full disk in the middle of real work: an emulator build on the server, a data owner's checkpoint.

The disk is a small tmpfs (root only; skipped with the reason otherwise) filled with a
ballast file until only a little is free. What must hold: a clear error that says the disk
is full, no half-written artifact or checkpoint, the previous state intact, and the same
work succeeds once space is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from offsite.client.engine.checkpoint import latest_checkpoint, load_checkpoint
from offsite.protos.channel import open_channel
from offsite.protos.v1 import models_pb2, models_pb2_grpc, operations_pb2, operations_pb2_grpc
from offsite.server.testing import ServerProcess, tiny_bundle

from .test_server_kill import _wait_done, assert_registry_intact, assert_store_whole
from .test_training_kill import ENV, _train


def _mount(path: Path, size: str) -> Path:
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or r.returncode}); needs root")
    return path


@pytest.fixture
def small_disk(tmp_path):
    mnt = _mount(tmp_path / "disk", "8m")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def test_a_full_disk_during_an_emulator_build_fails_it_clearly_and_leaves_nothing(small_disk, tmp_path):
    bundle = tiny_bundle()
    srv = ServerProcess(small_disk / "srv", extra_args=["--signing-key", str(bundle.signing_key)])
    srv.log = tmp_path / "server.log"  # the log must not fill the small disk itself
    srv.start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        ballast = fill(small_disk, leave=768 << 10)  # the tiny bundle alone is ~1.3 MB
        emus = models_pb2_grpc.EmulatorsStub(admin)
        ops = operations_pb2_grpc.OperationsStub(admin)
        done = _wait_done(ops, emus.BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny")).id)
        assert done.state == operations_pb2.OPERATION_STATE_FAILED
        assert "disk is full" in done.error, done.error
        assert "Traceback" not in done.error
        assert not emus.ListEmulators(models_pb2.ListEmulatorsRequest()).emulators  # no half emulator
        assert not [p.name for p in (srv.data_dir / "work").iterdir() if done.id in p.name]
        assert not list((srv.data_dir / "artifacts" / "tmp").iterdir())
        assert_store_whole(srv.data_dir)
        ballast.unlink()  # space is back: the same build succeeds on the same server
        again = _wait_done(ops, emus.BuildEmulator(models_pb2.BuildEmulatorRequest(model="tiny")).id)
        assert again.state == operations_pb2.OPERATION_STATE_SUCCEEDED, again.error
    finally:
        srv.kill()
    assert_store_whole(small_disk / "srv")
    assert_registry_intact(small_disk / "srv")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes(small_disk, tmp_path):
    bundle = tiny_bundle()
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"}) + "\n" for i in range(16))
    )
    # How big one checkpoint is, measured on a normal disk with the same command.
    probe = tmp_path / "probe"
    r = subprocess.run(
        _train(bundle, data, tmp_path / "probe.safetensors", probe),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    size = sum(p.stat().st_size for p in latest_checkpoint(probe).rglob("*") if p.is_file())

    ckpt, out = small_disk / "ckpt", tmp_path / "adapter.safetensors"
    ballast = fill(small_disk, leave=int(1.5 * size))  # one checkpoint fits, the next one does not
    t0 = time.monotonic()
    r = subprocess.run(_train(bundle, data, out, ckpt), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "disk is full" in r.stderr, r.stderr[-2000:]
    assert not out.exists(), "a run that could not checkpoint wrote an adapter"
    kept = latest_checkpoint(ckpt)
    assert kept is not None and kept.name == "step-000002", sorted(p.name for p in ckpt.iterdir())
    load_checkpoint(kept)  # whole and readable
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step-000002"], "a half checkpoint was left"
    ballast.unlink()
    metrics = tmp_path / "metrics.json"
    r = subprocess.run(
        _train(bundle, data, out, ckpt) + ["--metrics-out", str(metrics)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(metrics.read_text())["resumed_from_step"] == 2
    assert time.monotonic() - t0 < 900
