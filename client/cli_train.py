"""`offsite-client train`: verify a bundle, then train its adapter on local data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from offsite.cli import console, err_console, fail, json_option
from offsite.files import is_disk_full


def train(
    bundle: Path = typer.Option(..., "--bundle", help="the bundle directory (or .tar) you fetched"),
    public_key: Path = typer.Option(..., "--public-key", help="the model owner's signing key (signing.pub)"),
    data: str = typer.Option(..., "--data", help="JSONL/text file or directory of your data (or 'python-reference')"),
    out: Path = typer.Option(..., "--out", help="where to write the adapter (.safetensors, keyed by original names)"),
    scheme: str = typer.Option(
        None,
        "--scheme",
        help="update scheme, e.g. full, top, norms, channels:0.25, lora:8, 'top:full,bottom:norms' (default: full)",
    ),
    memory_budget: str = typer.Option(
        None,
        "--memory-budget",
        help="choose the scheme to fit this peak memory: auto (the minimum measured on this machine plus "
        "a margin) or a size, e.g. 600MB",
    ),
    steps: int = typer.Option(50, "--steps", min=1),
    lr: float = typer.Option(1e-4, "--lr"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd (sgd keeps no optimizer state)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    block_size: int = typer.Option(256, "--block-size", min=8),
    seed: int = typer.Option(0, "--seed"),
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16 or auto (bf16 where the hardware has it)"),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="share of your data held out for evaluation"),
    checkpoint_dir: Path = typer.Option(None, "--checkpoint-dir", help="write checkpoints here and resume from them"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="steps between checkpoints (0: at the end)"),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing/--no-activation-checkpointing"),
    initial_adapter: Path = typer.Option(
        None, "--initial-adapter", help="start from this adapter (e.g. the last round's)"
    ),
    metrics_out: Path = typer.Option(None, "--metrics-out", help="also write the metrics record to this JSON file"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    json_out: bool = json_option("print the metrics record as JSON"),
) -> None:
    """Train the adapter of a verified bundle on your own data; the data never leaves this machine.

    Example: offsite-client train --bundle bundle/ --public-key signing.pub --data my.jsonl
    --memory-budget auto --steps 100 --out adapter.safetensors --json
    """
    # Imported here, not at the top of the file: torch and the engine cost seconds and ~250 MB
    # of RSS, which `offsite-client --help`, `enroll` and `fetch` should never pay.
    from offsite.emulators.adapter import AdapterError, load_adapter, save_adapter
    from offsite.emulators.bundle import BundleError, load_bundle
    from offsite.emulators.data import DataError, load_examples

    from .engine import BudgetError, CheckpointError, EngineError, SchemeError, TrainConfig, parse_memory, train_adapter

    if scheme and memory_budget:
        fail("--scheme and --memory-budget exclude each other: give a scheme, or a budget to choose one", json_out)
    try:
        budget_mb = parse_memory(memory_budget) if memory_budget else None
    except BudgetError as e:
        fail(str(e), json_out)
    import torch

    from .engine.pruning import resolve_precision

    try:
        vocab_dtype = resolve_precision(precision, torch.device("cpu"))
    except ValueError as e:
        fail(str(e), json_out)
    try:
        # verifies the signature and every file's hash first; the lean runtime where it applies,
        # with the vocabulary decoded straight into the compute dtype
        loaded = load_bundle(bundle, public_key, runtime="auto", vocab_dtype=vocab_dtype)
    except (BundleError, OSError) as e:
        fail(f"bundle {bundle} failed verification, refusing to train on it: {e}", json_out)
    try:
        examples = load_examples(data, loaded.tokenizer)
    except DataError as e:
        fail(str(e), json_out)
    start = None
    if initial_adapter is not None:
        try:
            start, meta = load_adapter(initial_adapter)
        except AdapterError as e:
            fail(str(e), json_out)
        if meta.get("base_model_digest") != loaded.base_digest:
            fail(f"{initial_adapter}: made for another base model than this bundle's", json_out)
    cfg = TrainConfig(
        scheme=scheme or "full",
        memory_budget_mb=budget_mb,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        batch_size=batch_size,
        grad_accum=grad_accum,
        block_size=block_size,
        seed=seed,
        precision=precision,
        eval_fraction=eval_fraction,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every,
        activation_checkpointing=activation_checkpointing,
        release_tokenizer=True,  # nothing after training tokenizes: its ~40 MB need not sit beside it
    )
    log = (
        (lambda m: err_console.print(m, highlight=False, soft_wrap=True))
        if not json_out or progress
        else (lambda m: None)
    )
    try:
        result = train_adapter(loaded, examples, cfg, progress=progress, initial_adapter=start, log=log)
    except (SchemeError, BudgetError, CheckpointError, EngineError, DataError, ValueError) as e:
        fail(str(e), json_out, code=1 if is_disk_full(e) else 2)  # a full disk is a failure, not bad usage
    m = result.metrics
    try:
        save_adapter(
            out,
            result.adapter_state,
            loaded.base_digest,
            scheme=m["scheme_resolved"],
            bundle_manifest_sha256=getattr(loaded, "manifest_sha256", ""),
            steps=str(steps),
            examples=str(m["examples"]),
            added_biases=",".join(m["added_biases"]),
        )
    except OSError as e:
        fail(f"could not write {out} ({e.strerror or e}); the adapter was not saved", json_out)
    record = {"ok": True, "adapter": str(out), **m}
    if metrics_out is not None:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(record, indent=2, default=str))
    if json_out:
        typer.echo(json.dumps(record, indent=2, default=str))
        return
    table = Table(title=f"trained {out}", show_header=False)
    for key in (
        "scheme",
        "scheme_resolved",
        "examples",
        "tokens",
        "loss_first",
        "loss_last",
        "eval_ppl_before",
        "eval_ppl_after",
        "trainable_params",
        "tokens_per_s",
        "peak_rss_mb",
        "precision",
    ):
        v = m.get(key)
        table.add_row(key, f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v))
    console.print(table)
