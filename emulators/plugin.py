"""Plug-in: put a trained adapter back into the full model, by parameter name.

The reference code copies adapter blocks by position, which breaks silently when the
split changes; here every tensor is addressed by its original name, its shape is checked,
and the adapter must carry the digest of the very base model it is plugged into.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from offsite.files import atomic_dir

from .adapter import AdapterError
from .models import LoadedModel


@torch.no_grad()
def plug_in(
    loaded: LoadedModel,
    adapter_state: dict[str, torch.Tensor],
    adapter_meta: dict[str, str] | None,
    expected_names: set[str] | None = None,
) -> PreTrainedModel:
    """Copy `adapter_state` (original names) into `loaded.model` in place and return it.

    Fails with AdapterError, before touching any weight, when the adapter was made for
    another base model, names a tensor the model lacks or a non-block tensor, has a wrong
    shape, or (with `expected_names`, e.g. a bundle's adapter names) is incomplete."""
    meta = adapter_meta or {}
    digest = meta.get("base_model_digest")
    if not digest:
        raise AdapterError(
            "the adapter does not say which base model it was made for (no base_model_digest); refusing to plug it in"
        )
    if digest != loaded.digest:
        raise AdapterError(
            f"the adapter was made for base model {digest[:16]}..., but {loaded.model_id} is {loaded.digest[:16]}...: "
            "plug it into the model its bundle was built from"
        )
    if not adapter_state:
        raise AdapterError("the adapter holds no tensors")
    params = dict(loaded.model.named_parameters())
    for name, tensor in adapter_state.items():
        if name not in params:
            raise AdapterError(f"adapter tensor {name!r} does not exist in {loaded.model_id}")
        if loaded.family.block_index(name) is None:
            raise AdapterError(
                f"adapter tensor {name!r} is not inside a transformer block; adapters carry whole blocks only"
            )
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise AdapterError(
                f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter tensor {name!r} holds NaN or infinite values; the training diverged")
    if expected_names is not None:
        missing = sorted(set(expected_names) - set(adapter_state))
        extra = sorted(set(adapter_state) - set(expected_names))
        if missing or extra:
            raise AdapterError(
                f"the adapter does not match the bundle's adapter blocks: {len(missing)} missing (e.g. {missing[:1]}), "
                f"{len(extra)} unexpected (e.g. {extra[:1]})"
            )
    for name, tensor in adapter_state.items():
        params[name].copy_(tensor.to(dtype=params[name].dtype, device=params[name].device))
    return loaded.model


def export_model_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained(out)` loads (safetensors),
    atomically: a staging dir beside `out`, renamed when complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AdapterError(f"--out {out} already exists; choose another path or pass --overwrite")
    # Models loaded from GGUF refuse save_pretrained while they carry the GGUF marker.
    if getattr(model, "hf_quantizer", None) is not None:
        raise AdapterError("the model still carries a quantizer; load it from the converted safetensors copy")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterError(
            f"--out {out}: cannot write in {out.parent} ({e.strerror}); choose a writable location"
        ) from None
    with atomic_dir(out, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if provenance is not None:
            (staging / "offsite-plugin.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return out
