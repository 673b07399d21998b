"""The adapter artifact: safetensors keyed by the *original* model's parameter names.

Keying by original names (``model.layers.28.mlp.up_proj.weight``, not the emulator's
position) is what lets plug-in and federated aggregation work by name and never by
position. Metadata records the base model digest so an adapter is never plugged into a
different model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from offsite.files import atomic_write

ADAPTER_FORMAT = "offsite-adapter/1"


class AdapterError(ValueError):
    """An adapter file is missing, unreadable, or made for another base model."""


def save_adapter(path: str | Path, state: dict[str, torch.Tensor], base_digest: str, **metadata: str) -> Path:
    """Write `state` atomically (offsite.files.atomic_write): never a half-written adapter."""
    meta = {"format": ADAPTER_FORMAT, "base_model_digest": base_digest, **{k: str(v) for k, v in metadata.items()}}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return atomic_write(path, save(tensors, metadata=meta))


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter: (state keyed by original names, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file; pass the .safetensors file that training wrote")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise AdapterError(f"{path}: not a readable safetensors adapter ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(
            f"{path}: not an Offsite adapter (metadata format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    return state, meta
