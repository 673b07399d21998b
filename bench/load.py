"""Load and soak (issue 16): many data owners against one real server, and jobs back to back.

**Load.** One `offsite-admin serve` child process on loopback, a tiny signed bundle, one job
and N data-owner tokens. N client threads start together; each does what a data owner does
with the real client code: `enroll` (the Enroll RPC, the key and enrollment saved to its
own home), `fetch_bundle` (resumable download, sha256, signature, unpack into its own
cache) and watches its job (WatchJob, first event). Reported: p50/p99/max of each call,
errors, and the server's RSS and open file descriptors sampled every 0.25 s from /proc.

**Soak.** J tiny federated jobs (tiny-llama, 2 clients, 1 round, 1 local step) back to back
through Flower's Simulation Engine (`run_simulation_job`: `flwr run` on the job's own local
simulation SuperLink, whose process tree holds the ServerApp and Ray), all in one data
directory, driven by this process as the server drives its jobs. After each: this process's
RSS and open fds, the processes it left running, the temporary directories left in $TMPDIR
(a private one), and the size of the data directory. The claim: RSS and fds at the end
within 10% of after the warm-up jobs, no process or temp dir left, the data directory
growing linearly.

    OMP_NUM_THREADS=1 python -m bench.load --clients 200 --soak-jobs 50 --json bench/results/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def machine_state() -> dict:
    """What the figures were measured on: load average, cores, memory, the date."""
    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "loadavg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "mem_gib": round(mem / 2**20, 1),
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(round(p * (len(v) - 1))))] * 1000, 1)

    return {
        "n": len(v),
        "p50_ms": q(0.50),
        "p99_ms": q(0.99),
        "max_ms": round(v[-1] * 1000, 1),
        "mean_ms": round(statistics.fmean(v) * 1000, 1),
    }


def _proc_sample(pid: int) -> tuple[float, int]:
    rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples, self.stop = pid, every_s, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                rss, fds = _proc_sample(self.pid)
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                return
            self.samples.append((round(time.monotonic() - self.t0, 2), round(rss, 1), fds))
            self.stop.wait(self.every_s)


def run_load(clients: int, work: Path) -> dict:
    import grpc

    from offsite.client.fetch import enroll, fetch_bundle
    from offsite.protos.channel import open_channel
    from offsite.protos.v1 import (
        admin_pb2,
        admin_pb2_grpc,
        artifacts_pb2,
        artifacts_pb2_grpc,
        jobs_pb2,
        jobs_pb2_grpc,
        models_pb2,
        models_pb2_grpc,
    )
    from offsite.server.testing import ServerProcess, tiny_bundle

    bundle = tiny_bundle()
    srv = ServerProcess(work / "srv", extra_args=["--signing-key", str(bundle.signing_key)]).start()
    try:
        admin = open_channel(srv.address, srv.admin_token)
        models_pb2_grpc.ModelsStub(admin).RegisterModel(
            models_pb2.RegisterModelRequest(name="tiny", source="tiny-llama")
        )
        with open(bundle.tar_path, "rb") as fh:
            data = fh.read()
        ref = artifacts_pb2_grpc.ArtifactsStub(admin).Upload(
            iter(
                [artifacts_pb2.UploadRequest(kind="bundle", name="tiny.tar")]
                + [artifacts_pb2.UploadRequest(data=data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
            )
        )
        emu = models_pb2_grpc.EmulatorsStub(admin).RegisterEmulator(
            models_pb2.RegisterEmulatorRequest(model="tiny", bundle_sha256=ref.sha256)
        )
        job = jobs_pb2_grpc.JobsStub(admin).CreateJob(
            jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(emulator_id=emu.id))
        )
        adm = admin_pb2_grpc.AdminStub(admin)
        tokens = [
            adm.CreateToken(
                admin_pb2.CreateTokenRequest(name=f"owner-{i:03d}", role="data-owner", jobs=[job.id])
            ).secret
            for i in range(clients)
        ]
        sampler = Sampler(srv.proc.pid)
        idle_rss, idle_fds = _proc_sample(srv.proc.pid)
        sampler.start()
        timings: dict[str, list[float]] = {"enroll": [], "fetch": [], "watch_first_event": [], "total": []}
        errors: list[str] = []
        lock = threading.Lock()
        go = threading.Barrier(clients)

        def owner(i: int) -> None:
            home, cache = work / "owners" / f"{i:03d}", work / "owners" / f"{i:03d}" / "cache"
            try:
                go.wait(120)
                t0 = time.perf_counter()
                e = enroll(srv.address, tokens[i], job.id, home=home, public_key=bundle.public_key)
                t1 = time.perf_counter()
                fetched = fetch_bundle(e, tokens[i], cache_dir=cache)
                assert not fetched.cached and fetched.size == len(data)
                t2 = time.perf_counter()
                ch = open_channel(srv.address, tokens[i])
                stream = jobs_pb2_grpc.JobsStub(ch).WatchJob(jobs_pb2.WatchJobRequest(id=job.id), timeout=60)
                first = next(iter(stream))
                assert first.job_id == job.id
                stream.cancel()
                ch.close()
                t3 = time.perf_counter()
                with lock:
                    timings["enroll"].append(t1 - t0)
                    timings["fetch"].append(t2 - t1)
                    timings["watch_first_event"].append(t3 - t2)
                    timings["total"].append(t3 - t0)
            except (Exception, grpc.RpcError) as exc:  # noqa: BLE001 - every failure is a counted result
                with lock:
                    errors.append(f"owner {i}: {type(exc).__name__}: {str(exc)[:200]}")

        threads = [threading.Thread(target=owner, args=(i,)) for i in range(clients)]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t_start
        time.sleep(2.0)  # let the server settle: what stays after the burst is what leaks
        settled_rss, settled_fds = _proc_sample(srv.proc.pid)
        sampler.stop.set()
        sampler.join()
        rss = [s[1] for s in sampler.samples]
        fds = [s[2] for s in sampler.samples]
        return {
            "clients": clients,
            "wall_s": round(wall, 1),
            "errors": len(errors),
            "error_samples": errors[:10],
            "calls": {k: _percentiles(v) for k, v in timings.items()},
            "bundle_bytes": len(data),
            "server_rss_mib": {
                "idle": round(idle_rss, 1),
                "peak": max(rss, default=0),
                "settled": round(settled_rss, 1),
            },
            "server_fds": {"idle": idle_fds, "peak": max(fds, default=0), "settled": settled_fds},
            "samples": sampler.samples[:: max(1, len(sampler.samples) // 60)],
        }
    finally:
        srv.kill()


def _tmp_dirs() -> set[str]:
    root = Path(tempfile.gettempdir())
    # Simulation scratch dirs go to /tmp when $TMPDIR is long (Ray's socket paths): count this process's.
    own = {p.name for p in Path("/tmp").glob(f"offsite-sim-{os.getpid()}-*")}
    return {p.name for p in root.iterdir() if p.is_dir()} | own


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_soak(jobs: int, work: Path, warmup: int = 1, on_row=None, max_s: float = 0.0) -> dict:
    from offsite.server.federation.job_runner import prepare_local_job, run_simulation_job
    from offsite.server.federation.process_guard import descendants

    data_dir = work / "soak"
    # A private temp root: what is left in it after a job is this process's leak, not a neighbour's.
    private_tmp = work / "tmp"
    private_tmp.mkdir()
    os.environ["TMPDIR"] = tempfile.tempdir = str(private_tmp)
    tmp_before = _tmp_dirs()
    rows = []
    started = time.monotonic()
    for n in range(1, jobs + 1):
        if max_s and n > 1 and time.monotonic() - started + rows[-1]["seconds"] > max_s:
            print(f"soak: stopping after {n - 1} jobs (--soak-max-minutes)", flush=True)
            break
        t0 = time.perf_counter()
        error = ""
        try:
            job = prepare_local_job(
                data_dir,
                "tiny-llama",
                clients=2,
                rounds=1,
                local_steps=1,
                batch_size=1,
                block_size=64,
                heldout_limit=2,
                min_clients=2,
                round_timeout=300,
                name=f"soak-{n}",
            )
            done = run_simulation_job(job)
            if done.get("status") != "completed":  # a run that ended without its release is a failed job
                raise RuntimeError(f"job ended {done.get('status')!r}: {done.get('error', '')}")
        except Exception as e:  # noqa: BLE001 - a failed job is a soak result (e.g. Ray's OOM killer)
            error = f"{type(e).__name__}: {str(e)[-300:]}"
        rss, fds = _proc_sample(os.getpid())
        rows.append(
            {
                "job": n,
                "seconds": round(time.perf_counter() - t0, 1),
                "rss_mib": round(rss, 1),
                "fds": fds,
                "data_dir_bytes": _dir_bytes(data_dir),
                "processes_left": len(descendants(os.getpid())),
                "error": error,
                "tmp_dirs_new": sorted(_tmp_dirs() - tmp_before)[:10],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if on_row is not None:  # a run cut short (a time limit) keeps what it measured
            on_row(rows)
    first, last = rows[min(warmup, len(rows)) - 1], rows[-1]
    growth = [b["data_dir_bytes"] - a["data_dir_bytes"] for a, b in zip(rows, rows[1:])]
    return {
        "jobs": len(rows),
        "jobs_asked": jobs,
        "warmup_jobs": warmup,
        "rows": rows,
        "rss_mib_range_after_warmup": [
            min(r["rss_mib"] for r in rows[warmup - 1 :]),
            max(r["rss_mib"] for r in rows[warmup - 1 :]),
        ],
        "fds_range_after_warmup": [
            min(r["fds"] for r in rows[warmup - 1 :]),
            max(r["fds"] for r in rows[warmup - 1 :]),
        ],
        "processes_left_max": max(r["processes_left"] for r in rows),
        "rss_change_pct": round(100 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"], 1),
        "fds_change_pct": round(100 * (last["fds"] - first["fds"]) / max(1, first["fds"]), 1),
        "tmp_dirs_leaked": sorted(_tmp_dirs() - tmp_before)[:20],
        "failed_jobs": sum(1 for r in rows if r["error"]),
        "data_dir_bytes_per_job": {"min": min(growth, default=0), "max": max(growth, default=0)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--soak-jobs", type=int, default=50, help="0 skips the soak")
    ap.add_argument("--soak-max-minutes", type=float, default=0.0, help="stop the soak before this (0: no limit)")
    ap.add_argument("--soak-warmup", type=int, default=1, help="jobs before the soak's reference point")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = {
        "bench": "load",
        "machine": machine_state(),
        "command": "python -m bench.load "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k != "json" and v is not None and v is not False
        ),
    }
    with tempfile.TemporaryDirectory(prefix="offsite-load-") as tmp:
        if not args.skip_load:
            out["load"] = run_load(args.clients, Path(tmp))
            print(json.dumps({k: v for k, v in out["load"].items() if k != "samples"}, indent=2), flush=True)
            if args.json:
                args.json.write_text(json.dumps(out, indent=2))
        if args.soak_jobs:

            def partial(rows: list) -> None:
                if args.json:
                    args.json.write_text(json.dumps(out | {"soak_partial_rows": rows}, indent=2))

            out["soak"] = run_soak(args.soak_jobs, Path(tmp), args.soak_warmup, partial, 60 * args.soak_max_minutes)
            print(json.dumps({k: v for k, v in out["soak"].items() if k != "rows"}, indent=2))
    out["machine_after"] = machine_state()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
