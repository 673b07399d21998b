"""The vocabulary matrices' storage codec: the token embedding and an untied LM head,
the largest tensors of a small model, stored as int8 rows or packed low-bit groups.

Encoding runs when a bundle is written (and replaces the model's copies with the decoded
values, so the model in memory is exactly what clients load); decoding runs when a
bundle is loaded, a slice of rows at a time so a bf16 client never holds the whole
matrix in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .bundle_format import EMULATOR_WEIGHTS, MANIFEST, SCALE_SUFFIX, BundleError
from .families import Family
from .lowbit import pack_matrix, unpack_matrix

if TYPE_CHECKING:  # the client's load path must not import transformers' model classes
    from transformers import PreTrainedModel


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes int8 [rows, cols], scale fp32 [rows, 1])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    codes = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


EMBEDDING_STORAGE = ("fp32", "int8", "int4", "int3", "int2")


def vocab_matrices(model: PreTrainedModel, family: Family) -> list[str]:
    """The big vocabulary matrices: the token embedding and an untied LM head."""
    names = []
    params = dict(model.named_parameters())  # tied duplicates removed: a tied head is skipped
    for name in (family.embeddings[0] + ".weight", family.lm_head + ".weight"):
        if name in params and params[name].dim() == 2:
            names.append(name)
    return names


@torch.no_grad()
def encode_vocab_matrices(
    model: PreTrainedModel, family: Family, storage: str, group_size: int = 64
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Encode the vocabulary matrices for storage and replace the model's copies with the
    decoded values, in place, so the model in memory is exactly what the bundle loads.

    "int8": symmetric int8 rows (near lossless); "int4"/"int3"/"int2": asymmetric groups
    along the hidden size, packed like QuantLinear weights (a deliberately lossy head: the
    plug-in uses the full model's own). Returns (manifest specs, tensors to store)."""
    if storage not in EMBEDDING_STORAGE:
        raise BundleError(f"embeddings storage must be one of {', '.join(EMBEDDING_STORAGE)}, got {storage!r}")
    specs: dict[str, dict] = {}
    stored: dict[str, torch.Tensor] = {}
    if storage == "fp32":
        return specs, stored
    params = dict(model.named_parameters())
    for name in vocab_matrices(model, family):
        p = params[name]
        if storage == "int8":
            codes, scale = int8_rows(p)
            p.copy_(codes.float() * scale)
            stored[name], stored[name + SCALE_SUFFIX] = codes, scale
            specs[name] = {"codec": "int8-row"}
        else:
            bits = int(storage[3:])
            packed = pack_matrix(p, bits, group_size)
            p.copy_(unpack_matrix(packed, bits, tuple(p.shape), p.dtype))
            for part, t in packed.items():
                stored[f"{name}@{part}"] = t.contiguous()
            specs[name] = {"codec": "packed", "bits": bits, "group_size": group_size, "shape": list(p.shape)}
    return specs, stored


def _decode_int8_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: int = 4096) -> torch.Tensor:
    """codes * scale, computed in fp32 a slice of rows at a time and stored in `dtype`, so a
    bf16 client never holds the whole matrix in fp32 (113 MB for SmolLM2's vocabulary)."""
    out = torch.empty(codes.shape, dtype=dtype)
    for i in range(0, codes.shape[0], rows):
        out[i : i + rows] = codes[i : i + rows].float() * scale[i : i + rows]
    return out


def decode_vocab_matrices(
    frozen: dict[str, torch.Tensor], specs: dict[str, dict], dtype: torch.dtype = torch.float32
) -> None:
    for name, spec in specs.items():
        if spec.get("codec") == "int8-row":
            codes, scale = frozen.pop(name, None), frozen.pop(name + SCALE_SUFFIX, None)
            if codes is None or scale is None or codes.dtype != torch.int8:
                raise BundleError(f"{EMULATOR_WEIGHTS}: {name} should be stored as int8 rows with a scale")
            frozen[name] = _decode_int8_rows(codes, scale, dtype)
        elif spec.get("codec") == "packed":
            parts = {k: frozen.pop(f"{name}@{k}", None) for k in ("qweight", "scales", "zeros")}
            if any(v is None for v in parts.values()):
                raise BundleError(f"{EMULATOR_WEIGHTS}: {name} should be stored packed (qweight, scales, zeros)")
            try:
                frozen[name] = unpack_matrix(parts, int(spec["bits"]), tuple(spec["shape"]), torch.float32).to(dtype)
            except ValueError as e:
                raise BundleError(f"{EMULATOR_WEIGHTS}: {name}: {e}") from None
        else:
            raise BundleError(f"{MANIFEST}: unknown storage codec {spec.get('codec')!r} for {name}")
