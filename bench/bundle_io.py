"""Bundle size and I/O cost per weight format: what a data owner downloads and loads.

    python -m bench.bundle_io [--model M] [--formats none,int8,int4,int3,int2] --json OUT

For each format of the middle blocks (every middle block kept, no distillation, no AWQ:
those change quality, not size), builds and signs a bundle, then in a fresh child process
verifies and loads it. Reports bundle bytes and their ratio to the fp32 base model, build
seconds, verify and load seconds, and the loading process's peak RSS (VmHWM). Times are
wall-clock on a shared machine: compare the rows of one run, not runs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help=__doc__)


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(bundle: str, pub: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OFFSITE_BENCH_THREADS", "2")))
    from offsite.emulators.bundle import load_bundle, verify_bundle

    t = time.perf_counter()
    verify_bundle(bundle, pub)
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    b = load_bundle(bundle, pub)
    load_s = time.perf_counter() - t
    ids = torch.randint(0, b.model.config.vocab_size, (1, 64))
    t = time.perf_counter()
    with torch.no_grad():
        b.model(ids)
    forward_s = time.perf_counter() - t
    print(
        json.dumps(
            {"verify_s": verify_s, "load_s": load_s, "forward_64_tokens_s": forward_s, "peak_rss_mb": _peak_rss_mb()}
        )
    )


@app.command()
def main(
    model: str = typer.Option("smollm2-135m", "--model"),
    formats: str = typer.Option("none,int8,int4,int3,int2", "--formats", help="comma-separated middle formats"),
    threads: int = typer.Option(2, "--threads"),
    json_out: Path = typer.Option(Path("bench/results/bundle_io.json"), "--json"),
    worker: str | None = typer.Option(None, "--worker", hidden=True),
    worker_pub: str | None = typer.Option(None, "--worker-pub", hidden=True),
) -> None:
    """Build each bundle format and measure its size, verify and load cost."""
    if worker:
        _worker(worker, worker_pub)
        return
    import torch
    from rich.console import Console
    from rich.table import Table

    from offsite.emulators.build import BuildConfig, build_bundle, model_fp32_bytes
    from offsite.emulators.models import load_model
    from offsite.emulators.signing import generate_signing_key

    torch.set_num_threads(threads)
    loaded = load_model(model)
    full_bytes = model_fp32_bytes(loaded.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bundle-io-") as tmp:
        key, pub = generate_signing_key(Path(tmp) / "keys")
        for fmt in [f.strip() for f in formats.split(",") if f.strip()]:
            out = Path(tmp) / f"bundle-{fmt}"
            t = time.perf_counter()
            manifest = build_bundle(BuildConfig(model=model, quantize=fmt), key, out, progress=False, loaded=loaded)
            build_s = time.perf_counter() - t
            size = sum(f["size"] for f in manifest["files"].values())
            env = {**os.environ, "OFFSITE_BENCH_THREADS": str(threads)}
            proc = subprocess.run(
                [sys.executable, "-m", "bench.bundle_io", "--worker", str(out), "--worker-pub", str(pub)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "format": fmt,
                    "bundle_bytes": size,
                    "ratio_to_fp32": size / full_bytes,
                    "embeddings": manifest["quantization"]["embeddings"],
                    "adapter": manifest["quantization"]["adapter"],
                    "build_s": round(build_s, 2),
                    **{k: round(v, 2) for k, v in child.items()},
                }
            )
            for p in sorted(out.iterdir()):
                p.unlink()
            out.rmdir()
    result = {"model": model, "full_model_fp32_bytes": full_bytes, "threads": threads, "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"bundle size and load cost, {model} (fp32 model {full_bytes / 1e6:.0f} MB)")
    for col in (
        "middle",
        "embeddings",
        "adapter",
        "bundle MB",
        "x fp32",
        "build s",
        "verify s",
        "load s",
        "fwd 64 tok s",
        "load peak RSS MB",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["format"],
            r["embeddings"],
            r["adapter"],
            f"{r['bundle_bytes'] / 1e6:.1f}",
            f"{r['ratio_to_fp32']:.3f}",
            f"{r['build_s']:.1f}",
            f"{r['verify_s']:.2f}",
            f"{r['load_s']:.2f}",
            f"{r['forward_64_tokens_s']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    app()
