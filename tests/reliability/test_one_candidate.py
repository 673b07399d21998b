"""The federation runner's registry writer after a restart past the release: the job keeps
its one candidate (the server-process half is in test_server_kill)."""

from __future__ import annotations

from offsite.server.federation.registry_link import RegistryLink


def test_a_second_release_report_reuses_the_jobs_candidate(tmp_path):
    link = RegistryLink(f"sqlite:///{tmp_path}/r.db", str(tmp_path / "artifacts"))
    reg = link.registry
    m = reg.add_model("m", "tiny-llama")
    e = reg.add_emulator(m.id, "a" * 64, {}, {})
    job = reg.add_job("j", m.id, e.id, {"rounds": 1})
    adapter = tmp_path / "adapter.safetensors"
    adapter.write_bytes(b"\1" * 64)
    first, second = {"adapter_path": str(adapter)}, {"adapter_path": str(adapter)}
    link.release_created(job.id, first)
    adapter.write_bytes(b"\2" * 64)  # the rerun's adapter differs; the candidate stays the first
    link.release_created(job.id, second)
    assert first["id"] == second["id"]
    assert [r.id for r in reg.list_releases(job_id=job.id)] == [first["id"]]
    assert second["adapter_sha256"] == first["adapter_sha256"]


def _open_files(name: str) -> int:
    import os

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += name in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def test_a_finished_job_gives_its_registry_connections_back(tmp_path):
    """One link per job (what each simulation run makes): none may keep registry.db open after."""
    db = tmp_path / "jobs.db"
    for n in range(3):
        link = RegistryLink(f"sqlite:///{db}", str(tmp_path / "artifacts"))
        reg = link.registry
        m = reg.add_model(f"m{n}", "tiny-llama")
        e = reg.add_emulator(m.id, "a" * 64, {}, {})
        job = reg.add_job("j", m.id, e.id, {"rounds": 1})
        link.job_finished(job.id, "completed", "")
    assert _open_files("jobs.db") == 0
