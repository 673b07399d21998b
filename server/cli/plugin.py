"""`offsite-admin plugin`: put a trained adapter into the full model and export it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from offsite.cli import JsonOption, console, err_console, fail


def plugin(
    model: str = typer.Option("smollm2-135m", "--model", help="the full base model the bundle was built from"),
    adapter: Path = typer.Option(..., "--adapter", help="adapter .safetensors (original parameter names)"),
    out: Path = typer.Option(
        ..., "--out", help="directory to write; AutoModelForCausalLM.from_pretrained(out) loads it"
    ),
    bundle: Path | None = typer.Option(
        None, "--bundle", help="also check the adapter against this bundle (base model and adapter blocks)"
    ),
    public_key: Path | None = typer.Option(None, "--public-key", help="verify --bundle with this signing.pub first"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an existing --out (only once the new one is complete)"
    ),
    json_out: bool = JsonOption,
) -> None:
    """Plug a trained adapter into the full model, by parameter name, and export a Hugging Face directory.

    Example: offsite-admin plugin --model smollm2-135m --adapter adapter.safetensors --out candidate
    """
    from offsite.emulators.adapter import load_adapter
    from offsite.emulators.bundle import read_manifest_unverified, verify_bundle
    from offsite.emulators.models import load_model
    from offsite.emulators.plugin import export_model_dir, plug_in

    try:
        if out.exists() and not overwrite:
            raise ValueError(f"--out {out} already exists; choose another path or pass --overwrite")
        state, meta = load_adapter(adapter)
        expected = None
        if bundle is not None:
            manifest = verify_bundle(bundle, public_key) if public_key else read_manifest_unverified(bundle)
            if manifest["base_model"]["digest"] != meta.get("base_model_digest"):
                raise ValueError(
                    f"{adapter} was made for base model {str(meta.get('base_model_digest'))[:16]}..., "
                    f"but bundle {bundle} is built from {manifest['base_model']['digest'][:16]}..."
                )
        with err_console.status(f"loading {model}"):
            loaded = load_model(model)
        if bundle is not None:
            from offsite.emulators.split import SplitPlan

            plan = SplitPlan.from_dict(manifest["plan"])
            adapter_blocks = set(plan.adapter_origin)
            expected = {n for n, _ in loaded.model.named_parameters() if loaded.family.block_index(n) in adapter_blocks}
        plug_in(loaded, state, meta, expected_names=expected)
        provenance = {
            "base_model_id": loaded.model_id,
            "base_model_digest": loaded.digest,
            "adapter": str(adapter),
            "adapter_tensors": len(state),
            "adapter_meta": meta,
        }
        with err_console.status(f"writing {out}"):
            export_model_dir(loaded.model, loaded.tokenizer, out, provenance=provenance, overwrite=overwrite)
    except (ValueError, OSError) as e:
        fail(str(e), json_out)
    result = {
        "ok": True,
        "out": str(out),
        "base_model": loaded.model_id,
        "base_model_digest": loaded.digest,
        "adapter_tensors": len(state),
    }
    if json_out:
        typer.echo(json.dumps(result))
    else:
        console.print(
            f"[green]plugged in[/green] {len(state)} adapter tensors into {loaded.model_id}; wrote {out}",
            highlight=False,
        )
