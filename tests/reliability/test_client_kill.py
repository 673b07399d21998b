"""`kill -9` of a data owner's process mid-download: the next run resumes from the bytes on
disk, and no byte is fetched twice.

The data owner is a child process running the client's resumable download
(`offsite.client.fetch.download_artifact`, what `offsite-client fetch` runs) against a real
server process; it is killed once a quarter of a 48 MiB artifact is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from offsite.protos.channel import open_channel
from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc
from offsite.server.testing import ServerProcess

FETCH = """
import json, sys, time
from pathlib import Path
from offsite.client.fetch import download_artifact
from offsite.protos.channel import open_channel
address, token, sha, part, slow = sys.argv[1:6]

def on_progress(done, total):
    if slow == "1":
        time.sleep(0.002)  # a slow line: the kill must land mid-stream

size, downloaded, resumes = download_artifact(lambda: open_channel(address, token), sha, Path(part),
                                              on_progress=on_progress, chunk_size=64 * 1024)
print(json.dumps({"size": size, "downloaded": downloaded}))
"""


def test_a_killed_data_owner_resumes_and_fetches_no_byte_twice(tmp_path):
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        token = srv.admin_token
        blob = os.urandom(48 << 20)
        ref = artifacts_pb2_grpc.ArtifactsStub(open_channel(srv.address, token)).Upload(
            iter(
                [artifacts_pb2.UploadRequest(kind="blob")]
                + [artifacts_pb2.UploadRequest(data=blob[i : i + (1 << 20)]) for i in range(0, len(blob), 1 << 20)]
            )
        )
        part = tmp_path / "owner" / "blob.part"
        args = [sys.executable, "-c", FETCH, srv.address, token, ref.sha256, str(part)]
        owner = subprocess.Popen([*args, "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not (part.exists() and part.stat().st_size >= len(blob) // 4):
            assert owner.poll() is None, owner.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the download never got a quarter in"
            time.sleep(0.01)
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        kept = part.stat().st_size
        assert 0 < kept < len(blob)
        # The next run (a new process) asks only for what is missing.
        r = subprocess.run([*args, "0"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["size"] == len(blob)
        assert result["downloaded"] == len(blob) - kept  # 0 bytes fetched twice
        assert hashlib.sha256(part.read_bytes()).hexdigest() == ref.sha256
    finally:
        srv.kill()
