"""A full disk and flipped bytes on disk, injected for real under a running server.

Full disk: the server's data directory is a small tmpfs (`mount -t tmpfs -o size=...`,
root only; skipped with the reason otherwise). Corruption: bytes of a stored blob are
overwritten while the server runs and after a restart.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from offsite.client.fetch import FetchError, download_artifact
from offsite.protos.channel import open_channel
from offsite.protos.v1 import admin_pb2, admin_pb2_grpc, artifacts_pb2, artifacts_pb2_grpc
from offsite.server.artifacts import ArtifactStore
from offsite.server.testing import ServerProcess

from .test_server_kill import assert_registry_intact, assert_store_whole


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted at tmp_path/disk, unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _upload(stub, data: bytes, kind: str = "blob"):
    return stub.Upload(
        iter(
            [artifacts_pb2.UploadRequest(kind=kind)]
            + [artifacts_pb2.UploadRequest(data=data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        )
    )


def test_a_full_disk_refuses_the_upload_cleanly_and_keeps_serving(small_disk, tmp_path):
    srv = ServerProcess(small_disk / "srv")
    srv.log = tmp_path / "server.log"  # the log must not fill the small disk itself
    srv.start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        arts = artifacts_pb2_grpc.ArtifactsStub(admin)
        kept = _upload(arts, os.urandom(1 << 20))
        with pytest.raises(grpc.RpcError) as e:
            _upload(arts, os.urandom(12 << 20))  # twice the disk
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "disk is full" in e.value.details()
        assert not list((small_disk / "srv" / "artifacts" / "tmp").iterdir())  # the partial upload is gone
        # Still serving: the earlier artifact, the registry (writes too, now that space is back).
        got = b"".join(c.data for c in arts.Download(artifacts_pb2.DownloadRequest(sha256=kept.sha256)))
        assert hashlib.sha256(got).hexdigest() == kept.sha256
        tok = admin_pb2_grpc.AdminStub(admin).CreateToken(admin_pb2.CreateTokenRequest(name="after", role="partner"))
        assert tok.secret
        small = _upload(arts, b"fits " * 1000)
        assert small.size == 5000
    finally:
        srv.kill()
    assert_store_whole(small_disk / "srv")
    assert_registry_intact(small_disk / "srv")


def test_a_corrupted_blob_is_detected_and_never_served(tmp_path):
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        token = srv.admin_token
        arts = artifacts_pb2_grpc.ArtifactsStub(open_channel(srv.address, token))
        good = _upload(arts, os.urandom(3 << 20))
        bad = _upload(arts, os.urandom(3 << 20))
        # Served once (verified and remembered), then flipped on disk while the server runs.
        assert (
            len(b"".join(c.data for c in arts.Download(artifacts_pb2.DownloadRequest(sha256=bad.sha256)))) == bad.size
        )
        path = ArtifactStore(srv.data_dir / "artifacts").path(bad.sha256)
        os.chmod(path, 0o644)
        with open(path, "r+b") as fh:
            fh.seek(bad.size // 2)
            byte = fh.read(1)
            fh.seek(bad.size // 2)
            fh.write(bytes([byte[0] ^ 0xFF]))
        for restarted in (False, True):
            if restarted:
                srv.kill()
                srv.start()
                arts = artifacts_pb2_grpc.ArtifactsStub(open_channel(srv.address, token))
            with pytest.raises(grpc.RpcError) as e:
                list(arts.Download(artifacts_pb2.DownloadRequest(sha256=bad.sha256)))
            assert e.value.code() == grpc.StatusCode.DATA_LOSS and "corrupted" in e.value.details()
            # The client's resumable download refuses it too, and keeps no bytes of it.
            part = tmp_path / f"cache-{restarted}" / "bad.part"
            with pytest.raises(FetchError, match="corrupted"):
                download_artifact(lambda: open_channel(srv.address, token), bad.sha256, part, retries=1)
            assert not part.exists()
            # Its neighbour is still served whole.
            got = b"".join(c.data for c in arts.Download(artifacts_pb2.DownloadRequest(sha256=good.sha256)))
            assert hashlib.sha256(got).hexdigest() == good.sha256
    finally:
        srv.kill()


def test_a_truncated_blob_is_refused_too(tmp_path):
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        arts = artifacts_pb2_grpc.ArtifactsStub(open_channel(srv.address, srv.admin_token))
        ref = _upload(arts, os.urandom(1 << 20))
        path = Path(ArtifactStore(srv.data_dir / "artifacts").path(ref.sha256))
        os.chmod(path, 0o644)
        os.truncate(path, ref.size // 3)
        with pytest.raises(grpc.RpcError) as e:
            list(arts.Download(artifacts_pb2.DownloadRequest(sha256=ref.sha256, offset=0)))
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
    finally:
        srv.kill()
