"""`offsite-admin demo`: the end-to-end path on the default model, as the stages of
`demo_stages.STAGES` (keys, bundle, verify, zero-shot, fine-tune, plug-in, federation, gate),
then a summary of the numbers, where every artifact is and what to run next."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.table import Table

from offsite.cli import console, emit_json, err_console, fail, json_option

from .demo_stages import DEFAULT_AWQ, DEFAULT_PRUNE, DEFAULT_QUANTIZE, STAGES, DemoConfig, run_demo

# What --fresh removes (the keys stay: a new key would orphan every bundle signed before).
RESULTS = (
    "bundle",
    "adapter.safetensors",
    "candidate",
    "train-ckpt",
    "demo-results.json",
    "federation",
    "gate",
    "gate-cache",
    "demo.log",
)


def _quality(res: dict) -> None:
    ppl, zs = res["ppl"], res["ppl"]["full_zero_shot"]
    table = Table(title=f"held-out python-reference perplexity ({res['eval_tokens']} tokens)")
    for col, justify in (("model", "left"), ("ppl", "right"), ("vs full zero-shot", "right")):
        table.add_column(col, justify=justify)
    for label, key in (
        ("full model, zero-shot", "full_zero_shot"),
        ("emulator, zero-shot", "emulator_zero_shot"),
        ("emulator + trained adapter", "emulator_finetuned"),
        ("plug-in (full model + adapter)", "plugin"),
    ):
        table.add_row(label, f"{ppl[key]:.2f}", f"{ppl[key] / zs:.3f}x")
    console.print(table)
    full = res.get("full_model_fp32_bytes")
    ratio = f" ({res['bundle_bytes'] / full:.2f} of the fp32 model)" if full else ""
    console.print(
        f"bundle {res['bundle_bytes'] / 2**20:.0f} MiB{ratio}; emulator+adapter / plug-in = "
        f"{res['protection_ratio']:.2f}x (the bundle alone should stay worse); "
        f"total {res['timings']['total_s']:.0f} s",
        highlight=False,
    )
    fed = res.get("federation")
    if fed:
        rounds = ", ".join(f"round {r['round']}: {r['plugin_ppl']:.2f}" for r in fed["rounds"] if r.get("plugin_ppl"))
        console.print(
            f"federated job {fed['job_id']}: plug-in perplexity by round ({rounds}); safety gate "
            f"[bold]{fed['gate']['verdict']}[/bold] -> release {fed['release']['id']} "
            f"{fed['release']['status']}",
            highlight=False,
        )


def _where_and_next(res: dict) -> None:
    p = res["paths"]
    rows = [
        ("signing key (keep secret) and public key", p["keys"]),
        ("signed emulator bundle", p["bundle"]),
        ("trained adapter", p["adapter"]),
        ("plugged-in model (HF directory)", p["candidate"]),
        ("federation registry (jobs, releases)", p["registry"]),
        ("safety gate report", p["gate_report"]),
        ("every number above (JSON)", p["results"]),
        ("library output (Ray, Flower)", p["library_log"]),
    ]
    table = Table(title="where things are")
    table.add_column("artifact")
    table.add_column("path", overflow="fold")
    for what, where in rows:
        if where:
            table.add_row(what, where)
    console.print(table)
    w = res["work_dir"]
    nxt = [
        f"offsite-admin emulators local inspect {p['bundle']} --public-key {p['keys']}/signing.pub",
        f"offsite-client train --bundle {p['bundle']} --public-key {p['keys']}/signing.pub --data my.jsonl "
        "--out adapter.safetensors",
    ]
    if res.get("federation"):
        job = res["federation"]["job_id"]
        nxt += [
            f"offsite-admin jobs local show {job} --data-dir {w}/federation",
            f"offsite-admin evals local gate {w}/gate --policy my-policy.yaml",
        ]
    nxt += ["offsite-admin serve --data-dir srv   # the same path for real data owners: docs/model-owner.md"]
    console.print("next:\n" + "\n".join(f"  {c}" for c in nxt), highlight=False, soft_wrap=True)


def demo(
    work_dir: Path = typer.Option(
        Path("demo-out"), "--work-dir", help="where keys, bundle, adapter and results go; re-running resumes"
    ),
    model: str = typer.Option(
        "smollm2-135m", "--model", help="base model (smollm2-135m, tiny-llama, or an HF directory)"
    ),
    quantize: str = typer.Option(
        DEFAULT_QUANTIZE, "--quantize", help="emulator middle weights: none|int8|int4|int3|int2"
    ),
    awq: bool = typer.Option(DEFAULT_AWQ, "--awq/--no-awq", help="activation-aware scaling before rounding"),
    prune: float = typer.Option(
        DEFAULT_PRUNE, "--prune", help="share of each middle block's MLP channels removed, gradient-scored (0: none)"
    ),
    emulator_layers: int | None = typer.Option(None, "--emulator-layers", help="middle blocks to keep (default: all)"),
    distill_steps: int = typer.Option(0, "--distill-steps", help="distillation steps of the emulator"),
    steps: int = typer.Option(40, "--steps", help="adapter fine-tuning steps on the emulator"),
    lr: float = typer.Option(1e-4, "--lr"),
    block_size: int = typer.Option(256, "--block-size"),
    eval_blocks: int = typer.Option(32, "--eval-blocks", help="held-out blocks per evaluation (0: all)"),
    rounds: int = typer.Option(
        2, "--rounds", help="federated rounds after the plug-in, then the safety gate (0: stop after the plug-in)"
    ),
    clients: int = typer.Option(2, "--clients", help="simulated data owners in the federated rounds"),
    local_steps: int = typer.Option(10, "--local-steps", help="training steps per data owner per round"),
    eval_limit: int = typer.Option(
        0,
        "--eval-limit",
        help="safety items per suite at the gate (0: every item; the default policy blocks a capped run)",
    ),
    gate_suites: str = typer.Option(
        "", "--gate-suites", help="comma-separated suites or categories at the gate (default: all)"
    ),
    fresh: bool = typer.Option(False, "--fresh", help="discard earlier results in --work-dir (keys are kept)"),
    no_export: bool = typer.Option(False, "--no-export", help="skip writing the plugged-in model directory"),
    json_out: bool = json_option("print the results as JSON"),
) -> None:
    """Run the end-to-end path, stage by stage; a re-run resumes after the last finished stage.

    Example: offsite-admin demo --work-dir demo-out --steps 40 --rounds 2 --clients 2
    """
    if fresh:
        for name in RESULTS:
            p = work_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    cfg = DemoConfig(
        model=model,
        quantize=quantize,
        awq=awq,
        prune_fraction=prune,
        emulator_layers=emulator_layers,
        distill_steps=distill_steps,
        steps=steps,
        lr=lr,
        block_size=block_size,
        eval_blocks=eval_blocks,
        export=not no_export,
        rounds=rounds,
        clients=clients,
        local_steps=local_steps,
        eval_limit=eval_limit,
        gate_suites=tuple(x for x in gate_suites.split(",") if x),
    )
    try:
        res = run_demo(work_dir, cfg, out=err_console)
    except (ValueError, OSError, RuntimeError) as e:
        fail(f"{e} (re-run the same command to resume; --fresh starts over)", json_out)
    if json_out:
        emit_json(res, indent=None)
        return
    _quality(res)
    _where_and_next(res)


demo.__doc__ += "\n\n    Stages: " + "; ".join(f"{s.name} ({s.party}): {s.what}" for s in STAGES) + "."
