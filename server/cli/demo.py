"""`offsite-admin demo`: the end-to-end path on the default model.

keys -> signed emulator bundle -> verify -> fine-tune the adapter on the emulator (the
data owner's side) -> plug-in into the full model -> quality table on held-out
python-reference text -> federated rounds of simulated data owners on the same bundle
(Flower) -> candidate release -> safety gate against the base model (demo_release.py). Each stage writes into the work directory and is skipped on a
re-run when its output is already there and matches the options, so an interrupted demo
resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import typer
from rich.table import Table

from offsite.cli import console, err_console, json_option

# The cheap but sensible default emulator: every middle block kept, stored at 3 bits with
# activation-aware scaling. On this model low-bit blocks beat dropped blocks by far, and
# 3 bits (unlike 4) keeps the emulator alone clearly worse than the plug-in (see
# ../shared/REFERENCES.md and bench/offsite_quality).
DEFAULT_QUANTIZE = "int3"
DEFAULT_AWQ = True


@dataclass
class DemoConfig:
    model: str = "smollm2-135m"
    quantize: str = DEFAULT_QUANTIZE
    awq: bool = DEFAULT_AWQ
    emulator_layers: int | None = None
    distill_steps: int = 0
    adapter_layers: tuple[int, int] = (2, 2)
    steps: int = 40
    lr: float = 1e-4
    rounds: int = 2  # federated rounds after the single-owner fine-tune (0: stop after plug-in)
    clients: int = 2
    local_steps: int = 10
    eval_limit: int = 0  # safety items per suite at the gate (0: every item; the policy blocks a capped run)
    gate_suites: tuple[str, ...] = ()  # suites or categories at the gate (empty: all)
    batch_size: int = 4
    block_size: int = 256
    eval_blocks: int = 32  # held-out blocks per evaluation (0: all)
    seed: int = 0
    export: bool = True


def _build_config(cfg: DemoConfig):
    from offsite.emulators.build import BuildConfig

    return BuildConfig(
        model=cfg.model, adapter_layers=tuple(cfg.adapter_layers), emulator_layers=cfg.emulator_layers,
        distill_steps=cfg.distill_steps, quantize=cfg.quantize, awq=cfg.awq, block_size=cfg.block_size, seed=cfg.seed,
    )


def _same_build(manifest: dict, build_cfg) -> bool:
    return manifest.get("build", {}).get("config") == json.loads(json.dumps(build_cfg.to_dict()))


def _train_fallback(bundle, blocks, cfg: DemoConfig, log: Callable[[str], None]) -> dict:
    """A plain AdamW loop over the adapter blocks, for when the client engine is absent."""
    import torch

    from offsite.emulators.losses import causal_lm_nll

    model = bundle.model
    names = set(bundle.adapter_parameter_names())
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    params = [p for n, p in model.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    step, losses = 0, []
    while step < cfg.steps:
        for ids, labels, mask in blocks.batches(cfg.batch_size, gen):
            nll, n = causal_lm_nll(model, ids, labels, mask)
            loss = nll / max(n, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss))
            step += 1
            if step % 10 == 0 or step == cfg.steps:
                log(f"step {step}/{cfg.steps} loss {losses[-1]:.3f}")
            if step >= cfg.steps:
                break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"engine": "demo-fallback", "loss_first": losses[0], "loss_last": losses[-1], "steps": step}


def run_demo(work_dir: Path, cfg: DemoConfig, log: Callable[[str], None] = lambda m: err_console.print(m, highlight=False)) -> dict:
    """Run (or resume) the demo in `work_dir`; returns the results that `--json` prints."""
    import torch

    from offsite.emulators.adapter import load_adapter, save_adapter
    from offsite.emulators.build import build_bundle
    from offsite.emulators.bundle import BundleError, load_bundle, verify_bundle
    from offsite.emulators.data import perplexity, python_reference_split, tokenize_examples
    from offsite.emulators.models import load_model
    from offsite.emulators.plugin import export_model_dir, plug_in
    from offsite.emulators.signing import generate_signing_key

    if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins (shared machines)
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.time()
    timings: dict[str, float] = {}
    work_dir.mkdir(parents=True, exist_ok=True)
    keys_dir, bundle_dir = work_dir / "keys", work_dir / "bundle"
    key_path, pub_path = keys_dir / "signing.key", keys_dir / "signing.pub"
    adapter_path, candidate_dir = work_dir / "adapter.safetensors", work_dir / "candidate"

    # 1. keys (the model owner's, once)
    if not (key_path.exists() and pub_path.exists()):
        generate_signing_key(keys_dir)
        log(f"1/8 keys: wrote {key_path} (mode 600) and {pub_path}")
    else:
        log(f"1/8 keys: reusing {keys_dir}")

    # 2. the signed bundle (the model owner's, once per configuration)
    t = time.time()
    loaded = load_model(cfg.model)
    build_cfg = _build_config(cfg)
    manifest = None
    if bundle_dir.exists():
        try:
            manifest = verify_bundle(bundle_dir, pub_path)
            if not _same_build(manifest, build_cfg) or manifest["base_model"]["digest"] != loaded.digest:
                manifest = None
        except BundleError:
            manifest = None
    if manifest is None:
        log(f"2/8 bundle: building {cfg.quantize}{' + AWQ' if cfg.awq else ''} emulator of {cfg.model} ...")
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("    {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            task = bar.add_task("building", total=1.0)
            manifest = build_bundle(build_cfg, key_path, bundle_dir, progress=False, overwrite=True, loaded=loaded,
                                    on_progress=lambda f, m: bar.update(task, completed=f, description=m[:60]))
        log(f"2/8 bundle: written to {bundle_dir} in {manifest['build']['build_seconds']} s")
    else:
        log(f"2/8 bundle: reusing {bundle_dir} (same configuration)")
    timings["bundle_s"] = round(time.time() - t, 1)
    bundle_bytes = sum(f["size"] for f in manifest["files"].values())

    # 3. the data owner verifies and loads it
    t = time.time()
    verify_bundle(bundle_dir, pub_path)
    bundle = load_bundle(bundle_dir, pub_path)
    log(f"3/8 verify: signature and {len(manifest['files'])} files OK; loaded the emulator in {time.time() - t:.1f} s")

    split = python_reference_split(n_shards=1)
    train_examples = split.shards[0]
    heldout = tokenize_examples(split.heldout, loaded.tokenizer, cfg.block_size)
    if cfg.eval_blocks and len(heldout) > cfg.eval_blocks:
        from offsite.emulators.data import TokenBlocks

        heldout = TokenBlocks(heldout.input_ids[: cfg.eval_blocks], heldout.labels[: cfg.eval_blocks], heldout.attention_mask[: cfg.eval_blocks])
    eval_tokens = heldout.n_loss_tokens

    def ppl(model, what: str) -> float:
        t0 = time.time()
        if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
            # QuantLinear unpacks its codes in every forward; plain Linears holding the same
            # dequantized values compute the same function, faster, for evaluation only.
            import copy

            from offsite.emulators.quantize import dequantize_module

            model = copy.deepcopy(model)
            dequantize_module(model)
        value = perplexity(model, heldout, batch_size=cfg.batch_size)
        log(f"    {what}: held-out ppl {value:.2f} ({time.time() - t0:.0f} s)")
        return value

    results: dict = {}
    log("4/8 zero-shot quality on held-out python-reference text")
    results["full_zero_shot"] = ppl(loaded.model, "full model, zero-shot")
    results["emulator_zero_shot"] = ppl(bundle.model, "emulator, zero-shot")

    # 4. fine-tune the adapter on the emulator (the data owner's side)
    t = time.time()
    train_meta: dict = {}
    reuse = False
    if adapter_path.exists():
        state, meta = load_adapter(adapter_path)
        reuse = meta.get("bundle_manifest_sha256") == bundle.manifest_sha256 and meta.get("demo_steps") == str(cfg.steps) \
            and meta.get("demo_lr") == str(cfg.lr)
    if reuse:
        bundle.load_adapter_state(state)
        log(f"5/8 fine-tune: reusing {adapter_path}")
        train_meta = {"reused": True}
    else:
        log(f"5/8 fine-tune: {cfg.steps} steps of the adapter on the emulator (batch {cfg.batch_size} x {cfg.block_size} tokens)")
        try:
            from offsite.client.engine import TrainConfig, train_adapter
        except ImportError:
            train_adapter = None
        if train_adapter is not None:
            tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, block_size=cfg.block_size, seed=cfg.seed,
                               checkpoint_dir=str(work_dir / "train-ckpt"), checkpoint_every=10)
            if hasattr(tcfg, "eval_batches") and cfg.eval_blocks:
                # The engine's own validation (its slice of the client's data) at the demo's scale.
                tcfg.eval_batches = max(1, cfg.eval_blocks // cfg.batch_size)
            result = train_adapter(bundle, train_examples, tcfg, progress=True)
            # The engine may leave frozen weights in a lower precision; evaluate a fresh fp32 copy.
            bundle = load_bundle(bundle_dir, pub_path)
            bundle.load_adapter_state(result.adapter_state)
            train_meta = {"engine": "offsite.client.engine", **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}}
        else:
            blocks = tokenize_examples(train_examples, bundle.tokenizer, cfg.block_size)
            train_meta = _train_fallback(bundle, blocks, cfg, log)
        state = bundle.adapter_state()
        save_adapter(adapter_path, state, bundle.base_digest, bundle_manifest_sha256=bundle.manifest_sha256,
                     demo_steps=cfg.steps, demo_lr=cfg.lr)
        shutil.rmtree(work_dir / "train-ckpt", ignore_errors=True)
        log(f"5/8 fine-tune: done in {time.time() - t:.0f} s; adapter saved to {adapter_path}")
    timings["train_s"] = round(time.time() - t, 1)
    results["emulator_finetuned"] = ppl(bundle.model, "emulator + trained adapter")
    del bundle

    # 5. plug the adapter into the full model
    log("6/8 plug-in: the trained adapter into the full model, by name")
    state, meta = load_adapter(adapter_path)
    plug_in(loaded, state, meta)
    results["plugin"] = ppl(loaded.model, "full model + plugged-in adapter")
    if cfg.export:
        export_model_dir(loaded.model, loaded.tokenizer, candidate_dir, overwrite=True,
                         provenance={"base_model_id": loaded.model_id, "base_model_digest": loaded.digest, "adapter": str(adapter_path)})
        log(f"    exported {candidate_dir} (AutoModelForCausalLM.from_pretrained loads it)")

    federated = None
    if cfg.rounds > 0:
        from .demo_release import RoundsConfig, run_rounds_and_gate

        del loaded  # the simulated data owners and the gate load their own copies
        t = time.time()
        federated = run_rounds_and_gate(
            work_dir, cfg.model, bundle_dir, pub_path,
            RoundsConfig(clients=cfg.clients, rounds=cfg.rounds, local_steps=cfg.local_steps, lr=cfg.lr,
                         heldout_limit=cfg.eval_blocks or 16, eval_limit=cfg.eval_limit, suites=tuple(cfg.gate_suites)), log)
        timings["federation_and_gate_s"] = round(time.time() - t, 1)

    zs, pl, ef = results["full_zero_shot"], results["plugin"], results["emulator_finetuned"]
    out = {
        "ok": True,
        "work_dir": str(work_dir),
        "config": {**asdict(cfg), "adapter_layers": list(cfg.adapter_layers)},
        "ppl": results,
        "plugin_gain_log_ppl": math.log(zs) - math.log(pl),
        "protection_ratio": ef / pl,  # emulator + adapter vs plug-in: > 1 means the bundle alone is worse
        "bundle_bytes": bundle_bytes,
        "full_model_fp32_bytes": manifest["base_model"].get("fp32_bytes"),
        "eval_tokens": eval_tokens,
        "training": train_meta,
        "federation": federated,  # rounds, candidate release and the safety gate's verdict (None: --rounds 0)
        "timings": {**timings, "total_s": round(time.time() - started, 1)},
        "paths": {"keys": str(keys_dir), "bundle": str(bundle_dir), "adapter": str(adapter_path),
                  "candidate": str(candidate_dir) if cfg.export else None},
    }
    (work_dir / "demo-results.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _print_table(res: dict) -> None:
    ppl = res["ppl"]
    zs = ppl["full_zero_shot"]
    table = Table(title=f"held-out python-reference perplexity ({res['eval_tokens']} tokens)")
    table.add_column("model")
    table.add_column("ppl", justify="right")
    table.add_column("vs full zero-shot", justify="right")
    rows = [
        ("full model, zero-shot", "full_zero_shot"),
        ("emulator, zero-shot", "emulator_zero_shot"),
        ("emulator + trained adapter", "emulator_finetuned"),
        ("plug-in (full model + adapter)", "plugin"),
    ]
    for label, key in rows:
        table.add_row(label, f"{ppl[key]:.2f}", f"{ppl[key] / zs:.3f}x")
    console.print(table)
    mb = res["bundle_bytes"] / 2**20
    full = res.get("full_model_fp32_bytes")
    ratio = f" ({res['bundle_bytes'] / full:.2f} of the fp32 model)" if full else ""
    console.print(
        f"bundle {mb:.0f} MiB{ratio}; emulator+adapter / plug-in = {res['protection_ratio']:.2f}x "
        f"(the bundle alone should stay worse); total {res['timings']['total_s']:.0f} s", highlight=False,
    )
    fed = res.get("federation")
    if fed:
        rounds = ", ".join(f"round {r['round']}: {r['plugin_ppl']:.2f}" for r in fed["rounds"] if r.get("plugin_ppl"))
        console.print(f"federated job {fed['job_id']}: plug-in ppl by round ({rounds}); safety gate "
                      f"[bold]{fed['gate']['verdict']}[/bold] -> release {fed['release']['id']} {fed['release']['status']}; "
                      f"report {fed['gate']['report']}", highlight=False)


def demo(
    work_dir: Path = typer.Option(Path("demo-out"), "--work-dir", help="where keys, bundle, adapter and results go; re-running resumes"),
    model: str = typer.Option("smollm2-135m", "--model", help="base model (smollm2-135m, tiny-llama, or an HF directory)"),
    quantize: str = typer.Option(DEFAULT_QUANTIZE, "--quantize", help="emulator middle weights: none|int8|int4|int3|int2"),
    awq: bool = typer.Option(DEFAULT_AWQ, "--awq/--no-awq", help="activation-aware scaling before rounding"),
    emulator_layers: int | None = typer.Option(None, "--emulator-layers", help="middle blocks to keep (default: all)"),
    distill_steps: int = typer.Option(0, "--distill-steps", help="distillation steps of the emulator"),
    steps: int = typer.Option(40, "--steps", help="adapter fine-tuning steps on the emulator"),
    lr: float = typer.Option(1e-4, "--lr"),
    block_size: int = typer.Option(256, "--block-size"),
    eval_blocks: int = typer.Option(32, "--eval-blocks", help="held-out blocks per evaluation (0: all)"),
    rounds: int = typer.Option(2, "--rounds", help="federated rounds after the plug-in, then the safety gate (0: stop after the plug-in)"),
    clients: int = typer.Option(2, "--clients", help="simulated data owners in the federated rounds"),
    local_steps: int = typer.Option(10, "--local-steps", help="training steps per data owner per round"),
    eval_limit: int = typer.Option(0, "--eval-limit", help="safety items per suite at the gate (0: every item; the default policy blocks a capped run)"),
    gate_suites: str = typer.Option("", "--gate-suites", help="comma-separated suites or categories at the gate (default: all)"),
    fresh: bool = typer.Option(False, "--fresh", help="discard earlier results in --work-dir (keys are kept)"),
    no_export: bool = typer.Option(False, "--no-export", help="skip writing the plugged-in model directory"),
    json_out: bool = json_option("print the results as JSON"),
) -> None:
    """Run the end-to-end path: keys, signed bundle, verify, fine-tune on the emulator, plug-in, quality
    table; then federated rounds (Flower simulation) and the safety gate on the resulting candidate.

    Example: offsite-admin demo --work-dir demo-out --steps 40 --rounds 2 --clients 2
    """
    if fresh:
        for name in ("bundle", "adapter.safetensors", "candidate", "train-ckpt", "demo-results.json", "federation", "gate",
                     "gate-cache"):
            p = work_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    cfg = DemoConfig(model=model, quantize=quantize, awq=awq, emulator_layers=emulator_layers, distill_steps=distill_steps,
                     steps=steps, lr=lr, block_size=block_size, eval_blocks=eval_blocks, export=not no_export,
                     rounds=rounds, clients=clients, local_steps=local_steps, eval_limit=eval_limit,
                     gate_suites=tuple(x for x in gate_suites.split(",") if x))
    try:
        res = run_demo(work_dir, cfg)
    except (ValueError, OSError) as e:
        if json_out:
            typer.echo(json.dumps({"ok": False, "error": str(e)}))
        else:
            err_console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    if json_out:
        typer.echo(json.dumps(res))
    else:
        _print_table(res)
