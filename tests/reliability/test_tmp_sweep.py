"""Temp files of a killed upload are removed when the server starts again, and only those.

A `kill -9` mid-upload leaves DATA_DIR/artifacts/tmp/upload-*; the restarted server removes
it. A temp file that another live writer still holds (a second server sharing the artifact
directory, here a process holding the flock the store's writers take) is left alone even
when it is old, and so is a fresh one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest

from offsite.protos.channel import open_channel
from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc

from .test_server_kill import _server, assert_store_whole

HOLDER = """
import fcntl, sys, time
fh = open(sys.argv[1], "ab")
fcntl.flock(fh, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_a_killed_uploads_temp_file_is_removed_at_start_and_a_live_one_is_kept(tmp_path):
    srv = _server(tmp_path).start()
    tmp_dir = srv.data_dir / "artifacts" / "tmp"
    holder = None
    try:
        arts = artifacts_pb2_grpc.ArtifactsStub(open_channel(srv.address, srv.admin_token))

        def chunks():
            yield artifacts_pb2.UploadRequest(kind="blob", name="big.bin")
            for i in range(24):
                if i == 8:
                    deadline = time.monotonic() + 30
                    while not list(tmp_dir.glob("upload-*")):  # the server is writing its temp file
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                    srv.kill()
                yield artifacts_pb2.UploadRequest(data=os.urandom(1 << 20))

        with pytest.raises(grpc.RpcError):
            arts.Upload(chunks())
        left = list(tmp_dir.glob("upload-*"))
        assert left, "the kill left no temp file (nothing to clean)"
        live = tmp_dir / "upload-live-writer"
        live.write_bytes(b"x" * 1024)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(live)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        fresh = tmp_dir / "upload-just-started"
        fresh.write_bytes(b"y")
        hour_ago = time.time() - 3600
        for p in [*left, live]:  # the crash was long ago; the live writer is slow, not dead
            os.utime(p, (hour_ago, hour_ago))

        srv.start()
        assert not [p for p in left if p.exists()], "the killed upload's temp file was kept"
        assert live.exists(), "a temp file a live writer holds was removed"
        assert fresh.exists(), "a fresh temp file was removed"
        assert_store_whole(srv.data_dir)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        srv.kill()
