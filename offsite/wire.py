"""Adapters on the Flower wire, shared by the data owner's ClientApp and the server.

Downlink and full uploads: fp32 arrays keyed by the base model's parameter names (Flower
carries an `ArrayRecord` through numpy, which has no bfloat16). Keys are names, so
aggregation and plug-in never depend on order; the only ordered view is `ordered_names`,
for the Flower path (SecAgg+) that forgets names and returns a plain list.

Sparse uploads: a client sends only what its scheme changed, as deltas against the
round's global adapter, in one ArrayRecord:

- ``NAME``: the delta values, fp16, or int8 codes with ``NAME|scale`` (fp32, one per row);
- ``NAME|cols`` (int32): when only some input columns of a 2-D weight changed (the
  engine's `channels:R` slices), the delta holds just those columns, in that order.

A tensor the client did not change is not sent, and the server averages each element
over the owners that sent it (`SparseMean`), so an owner that did not train a tensor
does not pull it towards zero. The reply's MetricRecord carries ``upload-sparse`` = 1 and
the measured encoding error ``upload-rel-error`` (||decoded - delta|| / ||delta||).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

SPARSE_KEY = "upload-sparse"
ERROR_KEY = "upload-rel-error"
UPLOAD_FORMATS = ("full", "sparse-fp16", "sparse-int8")
_COLS, _SCALE = "|cols", "|scale"


class AdapterMismatchError(ValueError):
    """Two adapters do not have the same parameter names and shapes."""


def ordered_names(state: dict[str, object]) -> list[str]:
    """The one agreed order of an adapter's names (sorted), for paths that drop the names."""
    return sorted(state)


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Adapter state (original names) -> ArrayRecord of fp32 numpy arrays, in sorted order."""
    return ArrayRecord(
        {k: Array(state[k].detach().to("cpu", torch.float32).contiguous().numpy()) for k in ordered_names(state)}
    )


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> adapter state (fp32 torch tensors, original names)."""
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32, copy=True)) for k, v in record.items()}


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in ordered_names(arrays)})


def record_nbytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord (the tensor bytes Flower ships)."""
    return int(sum(len(v.data) for v in record.values()))


def named_from_list(
    names: list[str], reference: dict[str, np.ndarray], arrays: list[np.ndarray]
) -> dict[str, np.ndarray]:
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
    """Refuse a reply whose adapter differs in names or shapes from the global adapter, or
    holds NaN/Inf (one such value would turn the whole average into NaN; issue 16)."""
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise AdapterMismatchError(f"{who}: adapter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in expected.items():
        if got[k].shape != v.shape:
            raise AdapterMismatchError(f"{who}: {k} has shape {got[k].shape}, expected {v.shape}")
        if not np.issubdtype(got[k].dtype, np.number) or not np.isfinite(got[k]).all():
            raise AdapterMismatchError(f"{who}: {k} holds non-finite values (NaN or Inf) or is not numeric")


def update_norm(new: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """Global L2 norm of (new - base) over all tensors."""
    total = 0.0
    for k, b in base.items():
        d = new[k].astype(np.float64) - b
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def bound_update(
    new: dict[str, np.ndarray], base: dict[str, np.ndarray], max_norm: float
) -> tuple[dict[str, np.ndarray], float, float]:
    """Scale (new - base) down to `max_norm` if it is longer; returns (bounded, norm, scale)."""
    norm = update_norm(new, base)
    if max_norm <= 0 or norm <= max_norm or norm == 0.0:
        return new, norm, 1.0
    scale = max_norm / norm
    return {k: (b + (new[k] - b) * scale).astype(np.float32) for k, b in base.items()}, norm, scale


# --- sparse uploads ---------------------------------------------------------------------


def _encode(values: np.ndarray, fmt: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(arrays to send for one tensor, the values the server will decode)."""
    if fmt == "sparse-fp16":
        half = values.astype(np.float16)
        return {"": half}, half.astype(np.float32)
    rows = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
    scale = np.abs(rows).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    decoded = (codes.astype(np.float32) * scale[:, None]).reshape(values.shape)
    return {"": codes.reshape(values.shape), _SCALE: scale.astype(np.float32)}, decoded


def encode_sparse_delta(
    new: dict[str, np.ndarray], base: dict[str, np.ndarray], fmt: str = "sparse-fp16"
) -> tuple[ArrayRecord, dict]:
    """What changed from `base` to `new`, as a sparse upload record, and its metrics.

    Only tensors with a nonzero delta travel; for a 2-D weight where at most half of the
    input columns changed, only those columns travel. Metrics: ``upload-sparse``,
    ``upload-rel-error`` (encoding error of the whole delta), ``upload-values`` sent."""
    if fmt not in UPLOAD_FORMATS[1:]:
        raise ValueError(f"sparse upload format must be one of {', '.join(UPLOAD_FORMATS[1:])}, got {fmt!r}")
    arrays: dict[str, Array] = {}
    err2 = total2 = 0.0
    sent = 0
    for name in ordered_names(base):
        delta = np.asarray(new[name], dtype=np.float32) - np.asarray(base[name], dtype=np.float32)
        if not delta.any():
            continue
        cols = None
        if delta.ndim == 2:
            changed = np.flatnonzero(np.abs(delta).sum(axis=0))
            if changed.size <= delta.shape[1] // 2:
                cols = changed.astype(np.int32)
                delta = np.ascontiguousarray(delta[:, cols])
        parts, decoded = _encode(delta, fmt)
        for suffix, arr in parts.items():
            arrays[name + suffix] = Array(np.ascontiguousarray(arr))
        if cols is not None:
            arrays[name + _COLS] = Array(cols)
        d64 = delta.astype(np.float64)
        err2 += float(np.sum((decoded - d64) ** 2))
        total2 += float(np.sum(d64 * d64))
        sent += delta.size
    metrics = {SPARSE_KEY: 1.0, ERROR_KEY: math.sqrt(err2 / total2) if total2 else 0.0, "upload-values": float(sent)}
    return ArrayRecord(arrays), metrics


def decode_sparse_delta(
    record: ArrayRecord, reference: dict[str, np.ndarray], who: str = "reply"
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """name -> (delta values fp32, input columns or None) of a sparse upload, checked against `reference`."""
    raw = {k: np.asarray(v.numpy()) for k, v in record.items()}
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for key, values in raw.items():
        if _COLS in key or _SCALE in key:
            continue
        if key not in reference:
            raise AdapterMismatchError(f"{who}: {key!r} is not a parameter of this adapter")
        want = reference[key].shape
        cols = raw.get(key + _COLS)
        if cols is not None:
            cols = cols.astype(np.int64)
            if (
                len(want) != 2
                or cols.ndim != 1
                or cols.size == 0
                or cols.min() < 0
                or cols.max() >= want[1]
                or np.unique(cols).size != cols.size
            ):
                raise AdapterMismatchError(f"{who}: {key}: bad column list for shape {tuple(want)}")
            want = (want[0], cols.size)
        if values.shape != tuple(want):
            raise AdapterMismatchError(f"{who}: {key} has shape {values.shape}, expected {tuple(want)}")
        if values.dtype == np.int8:
            scale = raw.get(key + _SCALE)
            rows = want[0] if len(want) > 1 else 1
            if scale is None or scale.shape != (rows,):
                raise AdapterMismatchError(f"{who}: {key}: int8 values need a {key + _SCALE} of {rows} row scales")
            values = (values.reshape(rows, -1).astype(np.float32) * scale.astype(np.float32)[:, None]).reshape(want)
        elif values.dtype in (np.float16, np.float32):
            values = values.astype(np.float32)
        else:
            raise AdapterMismatchError(f"{who}: {key} has dtype {values.dtype}; expected float16, float32 or int8")
        if not np.isfinite(values).all():
            raise AdapterMismatchError(f"{who}: {key} holds non-finite values")
        out[key] = (values, cols)
    stray = [k for k in raw if (_COLS in k or _SCALE in k) and k.split("|")[0] not in out]
    if stray:
        raise AdapterMismatchError(f"{who}: {stray[0]!r} belongs to no sent tensor")
    return out


def sparse_norm(delta: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> float:
    return math.sqrt(
        sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64))) for v, _ in delta.values())
    )


class SparseMean:
    """Weighted mean of sparse deltas, element by element over the owners that sent each one."""

    def __init__(self, reference: dict[str, np.ndarray]):
        self.reference = reference
        self.num: dict[str, np.ndarray] = {}
        self.den: dict[str, np.ndarray] = {}

    def add(self, delta: dict[str, tuple[np.ndarray, np.ndarray | None]], weight: float, scale: float = 1.0) -> None:
        for name, (values, cols) in delta.items():
            if name not in self.num:
                self.num[name] = np.zeros(self.reference[name].shape, dtype=np.float64)
                self.den[name] = np.zeros(
                    self.reference[name].shape[-1:] if self.reference[name].ndim == 2 else self.reference[name].shape,
                    dtype=np.float64,
                )
            if cols is None:
                self.num[name] += weight * scale * values
                self.den[name] += weight  # a whole 2-D tensor counts for every column
            else:
                self.num[name][:, cols] += weight * scale * values
                self.den[name][cols] += weight

    def apply(self, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`base` plus the mean delta; tensors (and columns) nobody sent stay as they are."""
        out = dict(base)
        for name, num in self.num.items():
            den = self.den[name]
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
            out[name] = (base[name] + mean).astype(np.float32)
        return out
