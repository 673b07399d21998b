"""Adapters on the wire: fp32 arrays keyed by original parameter names.

Flower carries an `ArrayRecord` through numpy, which has no bfloat16, so every tensor is
sent as contiguous fp32. Keys are the base model's parameter names, so aggregation and
plug-in never depend on order; the only ordered view is `ordered_names`, used where a
Flower path (SecAgg+) forgets the names and returns a plain list.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


class AdapterMismatchError(ValueError):
    """Two adapters do not have the same parameter names and shapes."""


def ordered_names(state: dict[str, object]) -> list[str]:
    """The one agreed order of an adapter's names (sorted), for paths that drop the names."""
    return sorted(state)


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Adapter state (original names) -> ArrayRecord of fp32 numpy arrays, in sorted order."""
    return ArrayRecord({k: Array(state[k].detach().to("cpu", torch.float32).contiguous().numpy()) for k in ordered_names(state)})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> adapter state (fp32 torch tensors, original names)."""
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32, copy=True)) for k, v in record.items()}


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in ordered_names(arrays)})


def named_from_list(names: list[str], reference: dict[str, np.ndarray], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Give back names to a list of arrays that a nameless path (SecAgg+) returned.

    Shapes are checked against `reference`, so a reordering can never pass silently."""
    if len(arrays) != len(names):
        raise AdapterMismatchError(f"got {len(arrays)} arrays for an adapter of {len(names)} tensors")
    out = {}
    for name, arr in zip(names, arrays):
        want = reference[name].shape
        arr = np.asarray(arr)
        if arr.size != int(np.prod(want)):
            raise AdapterMismatchError(f"{name}: got {arr.size} values, expected shape {tuple(want)}")
        out[name] = arr.reshape(want).astype(np.float32)
    return out


def check_same_layout(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], who: str) -> None:
    """Refuse a reply whose adapter differs in names or shapes from the global adapter."""
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise AdapterMismatchError(f"{who}: adapter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in expected.items():
        if got[k].shape != v.shape:
            raise AdapterMismatchError(f"{who}: {k} has shape {got[k].shape}, expected {v.shape}")


def update_norm(new: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """Global L2 norm of (new - base) over all tensors."""
    total = 0.0
    for k, b in base.items():
        d = new[k].astype(np.float64) - b
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def bound_update(new: dict[str, np.ndarray], base: dict[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float, float]:
    """Scale (new - base) down to `max_norm` if it is longer; returns (bounded, norm, scale)."""
    norm = update_norm(new, base)
    if max_norm <= 0 or norm <= max_norm or norm == 0.0:
        return new, norm, 1.0
    scale = max_norm / norm
    return {k: (b + (new[k] - b) * scale).astype(np.float32) for k, b in base.items()}, norm, scale


def record_nbytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord (the tensor bytes Flower ships)."""
    return int(sum(len(v.data) for v in record.values()))
