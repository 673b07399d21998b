"""Writes a federated job's rounds and its candidate release into the server's registry.

Used by the ServerApp itself, in whichever process Flower runs it (in a deployment that is
a SuperLink-side process, not our server), so it talks to the registry database and the
artifact store directly, the same way `JobRunContext.record_round/create_release` do.
"""

from __future__ import annotations

from pathlib import Path

from offsite.server.artifacts import ArtifactStore
from offsite.server.registry import Registry


class RegistryLink:
    def __init__(self, url: str, artifacts_root: str = ""):
        self.registry = Registry(url)
        self.store = ArtifactStore(artifacts_root) if artifacts_root else None

    def _put(self, path: str | Path, name: str) -> str:
        if self.store is None or not path:
            return ""
        sha = self.store.put_file(path)
        self.registry.add_artifact(sha, self.store.size(sha), "adapter", name)
        return sha

    def job_started(self, job: dict) -> None:
        row = self.registry.get_job(job["id"])
        if row.state != "running":
            self.registry.update_job(job["id"], state="running", error="")
        self.registry.add_job_event(
            job["id"],
            "federation",
            {
                "engine": job.get("engine", ""),
                "plugin_ppl_initial": job.get("plugin_ppl_initial"),
                "resumed_from_round": job.get("resumed_from_round", 0),
            },
        )

    def round_done(self, job_id: str, record: dict) -> None:
        sha = self._put(record.get("adapter_path", ""), f"{job_id}-round{record['round']}.safetensors")
        self.registry.add_round(job_id, int(record["round"]), record, sha)

    def last_round(self, job_id: str) -> int:
        row = self.registry.last_round(job_id)
        return row.number if row else 0

    def release_created(self, job_id: str, release: dict) -> None:
        sha = self._put(release["adapter_path"], f"{job_id}-adapter.safetensors") or release["adapter_sha256"]
        job = self.registry.get_job(job_id)
        metrics = {k: v for k, v in release.items() if k not in ("id", "status")}
        if job.release_id:  # a run restarted after its release (a killed server): never a second candidate
            row = self.registry.get_release(job.release_id)
        else:
            row = self.registry.create_release(job_id, job.model_id, sha, metrics)
        release["id"] = row.id
        release["status"] = row.status
        release["adapter_sha256"] = row.adapter_sha256

    def job_finished(self, job_id: str, state: str, error: str) -> None:
        try:
            self.registry.update_job(job_id, state=state, error=error[:2000])
        finally:
            # The job is over: give its database connections back (the soak of bench.load found
            # a process running jobs back to back keeping registry.db + -wal open per job).
            # A later call reconnects, so this costs nothing if someone writes again.
            self.registry.close()
