"""`offsite-admin emulators local ...`: build, verify and inspect signed emulator bundles."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offsite.cli import JsonOption, console, err_console, fail, int_list, json_option

app = typer.Typer(no_args_is_help=True, help="Build, verify and inspect signed emulator bundles on this machine.")


@app.callback()
def _emulator() -> None:
    """Build, verify and inspect signed emulator bundles."""


def _block_bits(text: str | None) -> dict[int, int] | None:
    if not text:
        return None
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(block): int(bits) for block, bits in pairs}
    except ValueError:
        raise typer.BadParameter(f"--block-bits must look like 10:2,11:2 (original block:bits); got {text!r}") from None


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# Build options that change what the emulator loses; none of them given means "the named default".
_LOSSY = (
    "quantize",
    "awq",
    "prune_fraction",
    "block_bits",
    "emulator_layers",
    "kept",
    "elevate_margin",
    "share_unique",
)


def _named_default_if_unset(options: dict) -> tuple[str, dict] | None:
    """(name, lossy options) of the model's named default when the command names no lossy
    option of its own; None for a model without a measured frontier (a tiny or local model)."""
    from offsite.emulators.frontier import FrontierError, load_frontier

    if options.get("distill_steps") or any(options.get(k) is not None for k in _LOSSY):
        return None
    try:
        frontier = load_frontier(options["model"])
        return frontier.named, frontier.named_build_options()
    except FrontierError:
        return None


@app.command("build")
def build(
    model: str = typer.Option(
        "smollm2-135m", "--model", help="smollm2-135m, tiny-llama|tiny-gpt2|tiny-opt, or a local HF model directory"
    ),
    adapter_layers: str = typer.Option(
        "2,2", "--adapter-layers", help="bottom,top blocks that form the trainable adapter"
    ),
    emulator_layers: int | None = typer.Option(
        None, "--emulator-layers", help="middle blocks to keep (uniform layer-drop); default: all"
    ),
    kept: str | None = typer.Option(
        None, "--kept", help="explicit original middle block indices to keep, e.g. 2,5,9 (instead of --emulator-layers)"
    ),
    distill_steps: int = typer.Option(
        0, "--distill-steps", help="distillation steps of the emulator on the corpus (resumable)"
    ),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="weight storage of the middle blocks: none|int8|int4|int3|int2 "
        "(with no lossy option given: the model's named default configuration, see below)",
    ),
    awq: bool | None = typer.Option(
        None, "--awq/--no-awq", help="activation-aware scaling before low-bit rounding (statistics from the corpus)"
    ),
    group_size: int = typer.Option(64, "--group-size", help="input channels per quantization group (int4/int3/int2)"),
    block_bits: str | None = typer.Option(
        None,
        "--block-bits",
        help="mixed precision: original block:bits pairs overriding --quantize, e.g. 10:2,11:2,20:8 (0 = fp32)",
    ),
    embeddings: str = typer.Option(
        "auto",
        "--embeddings",
        help="storage of the embedding/LM head: auto (int8 rows when quantized)|fp32|int8|int4|int3|int2",
    ),
    corpus: str = typer.Option(
        "python-reference", "--corpus", help="python-reference, or a JSONL/text file or directory"
    ),
    block_size: int = typer.Option(256, "--block-size", help="tokens per training block"),
    seed: int = typer.Option(0, "--seed"),
    signing_key: Path = typer.Option(
        ..., "--signing-key", help="the model owner's signing.key (from `offsite-admin keys init`)"
    ),
    out: Path = typer.Option(..., "--out", help="bundle directory to create (must not exist)"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an existing bundle at --out (only once the new one is complete)"
    ),
    prune: float | None = typer.Option(
        None, "--prune", help="share of each middle block's MLP channels removed, gradient-scored (e.g. 0.25)"
    ),
    elevate: float | None = typer.Option(
        None,
        "--elevate",
        help="loss elevation: train the middle norms so the emulator's loss sits H nats above (e.g. 0.3)",
    ),
    share: int | None = typer.Option(
        None,
        "--share",
        help="layer sharing: keep this many distinct middle blocks, each repeated over its cluster (depth unchanged)",
    ),
    protection: float | None = typer.Option(
        None,
        "--protection",
        help="pick the lossy options from the measured frontier: the most transfer at this protection against a data owner who fine-tunes every weight, on general text (e.g. 1.3)",
    ),
    json_out: bool = json_option("print the manifest as JSON"),
) -> None:
    """Build and sign an emulator bundle.

    With no lossy option (--quantize, --awq, --prune, --block-bits, --emulator-layers, --kept,
    --distill-steps, --elevate, --share, --protection), a model with a measured frontier gets its
    named default configuration, the one `make demo` ships (smollm2-135m: int4-awq-prune10);
    `--quantize none` builds a lossless middle, which protects nothing.

    Example (privacy-utility dial): offsite-admin emulators local build --protection 1.3 --signing-key keys/signing.key --out bundle

    Example: offsite-admin emulators local build --model smollm2-135m --adapter-layers 2,2 --quantize int3 --awq
    --signing-key keys/signing.key --out bundle
    """
    from offsite.emulators.build import BuildConfig, build_bundle

    layers = int_list(adapter_layers, "--adapter-layers")
    if len(layers) != 2:
        fail(f"--adapter-layers must be two numbers 'bottom,top', e.g. 2,2; got {adapter_layers!r}", json_out)
    options = dict(
        model=model,
        adapter_layers=(layers[0], layers[1]),
        emulator_layers=emulator_layers,
        distill_steps=distill_steps,
        quantize=quantize,
        awq=awq,
        corpus=corpus,
        block_size=block_size,
        seed=seed,
        kept=int_list(kept, "--kept") or None,
        group_size=group_size,
        embeddings=embeddings,
        block_bits=_block_bits(block_bits),
        prune_fraction=prune,
        elevate_margin=elevate,
        share_unique=share,
    )
    named = _named_default_if_unset(options) if protection is None else None
    if named:
        options.update(named[1])
        if not json_out:
            err_console.print(f"no lossy option given: building {named[0]}, the named default of {model}")
    if protection is not None:
        from offsite.emulators.frontier import FrontierError, dial_options

        try:
            options.update(dial_options(model, protection, options))
        except FrontierError as e:
            fail(str(e), json_out)
    cfg = BuildConfig(**{k: v for k, v in options.items() if v is not None})
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console,
        transient=json_out,
    ) as bar:
        task = bar.add_task("building", total=1.0)

        def on_progress(fraction: float, message: str) -> None:
            bar.update(task, completed=min(max(fraction, 0.0), 1.0), description=message[:70])

        try:
            manifest = build_bundle(cfg, signing_key, out, progress=True, on_progress=on_progress, overwrite=overwrite)
        except (ValueError, OSError) as e:
            bar.stop()
            fail(str(e), json_out)
        except KeyboardInterrupt:
            bar.stop()
            fail(
                "interrupted: nothing was written at --out; re-run the same command to resume distillation",
                json_out,
                130,
            )
    if json_out:
        typer.echo(json.dumps({"ok": True, "bundle": str(out), "manifest": manifest}))
        return
    _print_summary(manifest, str(out), verified=True)


@app.command("verify")
def verify(
    bundle: Path = typer.Argument(..., help="bundle directory or .tar"),
    public_key: Path = typer.Option(..., "--public-key", help="the model owner's signing.pub"),
    json_out: bool = JsonOption,
) -> None:
    """Verify a bundle's signature and every file's size and sha256; exit 1 with the reason if anything is off.

    Example: offsite-admin emulators local verify bundle --public-key keys/signing.pub
    """
    from offsite.emulators.bundle import BundleError, verify_bundle

    try:
        manifest = verify_bundle(bundle, public_key)
    except BundleError as e:
        fail(f"{bundle}: verification FAILED: {e}", json_out, code=1)
    files = manifest["files"]
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "bundle": str(bundle),
                    "files": len(files),
                    "base_model": manifest["base_model"],
                    "signer": manifest.get("signer"),
                }
            )
        )
        return
    console.print(
        f"[green]OK[/green] {bundle}: signature valid, {len(files)} files match the manifest "
        f"(base model {manifest['base_model']['id']}, digest {manifest['base_model']['digest'][:16]}...)",
        highlight=False,
    )


@app.command("inspect")
def inspect_bundle(
    bundle: Path = typer.Argument(..., help="bundle directory or .tar"),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="verify first with this signing.pub (otherwise shown unverified)"
    ),
    json_out: bool = JsonOption,
) -> None:
    """Show a bundle's kept layers and their origin, quantization, sizes and digests.

    Example: offsite-admin emulators local inspect bundle --json
    """
    from offsite.emulators.bundle import BundleError, bundle_summary, read_manifest_unverified, verify_bundle

    try:
        manifest = verify_bundle(bundle, public_key) if public_key else read_manifest_unverified(bundle)
    except (BundleError, ValueError) as e:
        fail(f"{bundle}: {e}", json_out, code=1)
    if json_out:
        from offsite.emulators.frontier import describe, for_manifest

        measured = for_manifest(manifest)
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "bundle": str(bundle),
                    "verified": public_key is not None,
                    **bundle_summary(manifest),
                    "measured_protection": describe(*measured) if measured else None,
                }
            )
        )
        return
    _print_summary(manifest, str(bundle), verified=public_key is not None)


def _print_summary(manifest: dict, where: str, verified: bool) -> None:
    from offsite.emulators.bundle import bundle_summary

    s = bundle_summary(manifest)
    base = s["base_model"]
    state = "[green]verified[/green]" if verified else "[yellow]not verified (pass --public-key)[/yellow]"
    console.print(f"bundle {where} ({state})", highlight=False)
    console.print(
        f"base model {base['id']} ({base['family']}/{base['model_type']}, {base['n_layers']} blocks), digest {base['digest']}",
        highlight=False,
    )
    q = s["quantization"]
    ratio = f"{s['ratio_to_base_fp32']:.3f}" if s["ratio_to_base_fp32"] else "-"
    console.print(
        f"size {_human(s['bundle_bytes'])} = {ratio} of the fp32 base model; middle {q.get('middle')}, "
        f"embeddings {q.get('embeddings')}, adapter {q.get('adapter', 'fp32')}",
        highlight=False,
    )
    from offsite.emulators.frontier import for_manifest, summary_line

    measured = for_manifest(manifest)
    console.print(
        summary_line(*measured)
        if measured
        else "protection: not measured for these build options "
        "(the measured configurations are in offsite/emulators/frontier.json)",
        highlight=False,
    )
    blocks = Table(title="blocks")
    for col in ("position", "original block", "role", "quantization", "bytes"):
        blocks.add_column(col)
    for b in s["blocks"]:
        qb = b.get("quantization")
        label = (
            (q.get("adapter", "fp32") if b["role"] == "adapter" else "fp32")
            if not qb
            else f"int{qb['bits']}"
            + (f" g{qb['group_size']}" if qb["bits"] != 8 else "")
            + (" awq" if qb.get("awq") else "")
        )
        if b.get("repeats") is not None:
            label += f" (repeats position {b['repeats']}, stored once)"
        blocks.add_row(str(b["position"]), str(b["origin"]), b["role"], label, _human(b.get("bytes")))
    console.print(blocks)
    files = Table(title="files")
    for col in ("file", "size", "sha256"):
        files.add_column(col)
    for name, f in sorted(s["files"].items()):
        files.add_row(name, _human(f["size"]), f["sha256"])
    console.print(files)
    build = s.get("build") or {}
    if build.get("build_seconds") is not None:
        console.print(
            f"built in {build['build_seconds']} s; signer key sha256 {s['signer']['ed25519_sha256']}", highlight=False
        )
