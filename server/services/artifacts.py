"""The Artifacts servicer: content-addressed downloads (resumable) and uploads."""

from __future__ import annotations

import asyncio

import grpc

from offsite.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, common_pb2

from ..artifacts import BlobWriter, check_sha256
from ..auth import current_principal
from ..registry import NotFound
from ..state import NAME_RE, ServerState
from .common import visible_jobs

_MIN_CHUNK, _MAX_CHUNK = 4096, 4 * 1024 * 1024


class ArtifactsService(artifacts_pb2_grpc.ArtifactsServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

    def _check_visible(self, sha: str) -> None:
        p = current_principal()
        if p.is_staff:
            return
        for job_id in visible_jobs(self.s, p) or []:
            job = self.s.registry.get_job(job_id)
            if job.emulator_id and self.s.registry.get_emulator(job.emulator_id).bundle_sha256 == sha:
                return
        raise NotFound(f"no artifact {sha} among the bundles of the jobs data owner {p.name!r} is enrolled in")

    async def StatArtifact(self, request, context):
        sha = check_sha256(request.sha256)
        self._check_visible(sha)
        row = self.s.registry.get_artifact(sha)
        return common_pb2.ArtifactRef(sha256=sha, size=self.s.store.size(sha), kind=row.kind, name=row.name)

    async def Download(self, request, context):
        sha = check_sha256(request.sha256)
        self._check_visible(sha)
        size = self.s.store.size(sha)
        offset = request.offset
        if offset < 0 or offset > size:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {offset} is outside the artifact (0..{size} bytes); restart from 0",
            )
        chunk = request.chunk_size or self.s.config.download_chunk_bytes
        if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
            raise ValueError(f"chunk_size {chunk} must be between {_MIN_CHUNK} and {_MAX_CHUNK} bytes (0 = default)")
        if offset == size:
            yield artifacts_pb2.DownloadChunk(offset=offset, data=b"", total_size=size, sha256=sha)
            return
        # Hashed before the first byte goes out (once per process): a corrupted blob is refused.
        with await asyncio.to_thread(self.s.store.open_verified, sha) as fh:
            fh.seek(offset)
            pos = offset
            while True:
                # Page-cache reads of <= 4 MiB take well under a millisecond; not worth a thread hop.
                data = fh.read(chunk)
                if not data:
                    break
                yield artifacts_pb2.DownloadChunk(offset=pos, data=data, total_size=size, sha256=sha)
                pos += len(data)

    async def Upload(self, request_iterator, context):
        writer = BlobWriter(self.s.store, self.s.config.max_upload_bytes)
        kind = name = expected = ""
        first = True
        try:
            async for msg in request_iterator:
                if first:
                    kind, name, expected = msg.kind or "blob", msg.name, msg.expected_sha256
                    if expected:
                        check_sha256(expected)
                    if not NAME_RE.match(kind):
                        raise ValueError(f"artifact kind {kind!r}: use letters, digits, . _ -")
                    first = False
                if msg.data:
                    writer.write(msg.data)
        except BaseException:
            writer.abort()
            raise
        sha = writer.commit(expected or None)
        row = self.s.registry.add_artifact(sha, writer.size, kind, name[:256])
        return common_pb2.ArtifactRef(sha256=sha, size=row.size, kind=row.kind, name=row.name)
