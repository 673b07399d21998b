"""Merging adapters of one base model trained by different jobs: average, task arithmetic,
TIES and DARE, on the deltas from the base model's own adapter blocks.

An Offsite adapter is whole transformer blocks keyed by original parameter names
(adapter.py). Its *task vector* is ``adapter - base`` for every tensor, where ``base`` is the
same tensor of the unmodified base model; methods combine task vectors and add the result
back to the base:

- ``average``: the weighted mean of the adapters (weights normalised to sum to 1);
  equivalently base + sum(w_i * delta_i) / sum(w).
- ``task-arithmetic`` (Ilharco et al. 2023): base + scale * sum(w_i * delta_i).
- ``ties`` (Yadav et al. 2023): trim each delta to its top ``density`` fraction by magnitude,
  elect each entry's sign by the sign of the summed trimmed deltas, average only the entries
  that agree with it (disjoint mean), then base + scale * that.
- ``dare`` (Yu et al. 2024): drop each delta entry with probability ``drop_rate`` = p, rescale
  the survivors by 1/(1-p) (so the expectation is unchanged), then task arithmetic.

The per-tensor arithmetic is peft's (``peft.utils.merge_utils``: ``task_arithmetic``,
``ties``, ``dare_linear``), which works on dense tensors of any shape. peft's
``add_weighted_adapter`` merges LoRA factors, but an Offsite adapter never carries them: the
client engine folds LoRA into the block weights before export (TrainResult), so every
merge here is on dense deltas.

Everything is checked before any arithmetic: the adapters and the base name the same base
model digest (a mismatch is named), hold the same tensor names and shapes, finite values,
and one weight per adapter. Functions are pure: inputs are never modified.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import asdict, dataclass

import torch

MERGE_METHODS = ("average", "task-arithmetic", "ties", "dare")
MAJORITY_SIGN_METHODS = ("total", "frequency")


class MergeError(ValueError):
    """Adapters that cannot be merged, or merge options that cannot work; the message says which."""


@dataclass(frozen=True)
class MergeConfig:
    """One merge. `weights`: one per adapter (None: 1 each). `scale` is the papers' lambda
    (task-arithmetic, ties, dare; `average` ignores it). `density`: TIES' kept fraction k.
    `drop_rate`: DARE's p. `majority_sign`: TIES' sign election, "total" (sum of the trimmed
    deltas, the paper) or "frequency" (count of signs). `seed`: DARE's random drops."""

    method: str = "ties"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    density: float = 0.2
    drop_rate: float = 0.5
    majority_sign: str = "total"
    seed: int = 0

    def validate(self, n_adapters: int) -> None:
        if self.method not in MERGE_METHODS:
            raise MergeError(f"merge method {self.method!r} is not one of {', '.join(MERGE_METHODS)}")
        if n_adapters < 2:
            raise MergeError(f"a merge needs at least two adapters, got {n_adapters}")
        if self.weights is not None:
            if len(self.weights) != n_adapters:
                raise MergeError(
                    f"{len(self.weights)} weights for {n_adapters} adapters: give exactly one weight per adapter, in order"
                )
            if not all(math.isfinite(w) for w in self.weights):
                raise MergeError(f"weights must be finite numbers, got {list(self.weights)}")
            if self.method == "average" and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
                raise MergeError(f"average weights must be non-negative with a positive sum, got {list(self.weights)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise MergeError(f"scale must be a positive number, got {self.scale}")
        if not 0 < self.density <= 1:
            raise MergeError(f"density (TIES' kept fraction) must be in (0, 1], got {self.density}")
        if not 0 <= self.drop_rate < 1:
            raise MergeError(f"drop rate (DARE's p) must be in [0, 1), got {self.drop_rate}")
        if self.majority_sign not in MAJORITY_SIGN_METHODS:
            raise MergeError(
                f"majority sign method {self.majority_sign!r} is not one of {', '.join(MAJORITY_SIGN_METHODS)}"
            )

    def hyperparameters(self) -> dict:
        """The options that affect this method's result (recorded in the merged adapter)."""
        d = asdict(self)
        keep = {
            "average": ("weights",),
            "task-arithmetic": ("weights", "scale"),
            "ties": ("weights", "scale", "density", "majority_sign"),
            "dare": ("weights", "scale", "drop_rate", "seed"),
        }[self.method]
        return {"method": self.method, **{k: (list(d[k]) if k == "weights" and d[k] else d[k]) for k in keep}}


# --- checks --------------------------------------------------------------------------


def check_same_base(digests: list[str], labels: list[str] | None = None, base_digest: str | None = None) -> str:
    """The one base digest every adapter names; MergeError naming the first mismatch."""
    labels = labels or [f"adapter {i + 1}" for i in range(len(digests))]
    for label, digest in zip(labels, digests):
        if not digest:
            raise MergeError(f"{label} does not say which base model it was made for (no base_model_digest)")
    first = base_digest or digests[0]
    for label, digest in zip(labels, digests):
        if digest != first:
            what = "the base model" if base_digest else labels[0]
            raise MergeError(
                f"{label} was made for base model {digest[:16]}..., but {what} is {first[:16]}...: "
                "only adapters of the same base model can be merged"
            )
    return first


def _check_states(base: dict[str, torch.Tensor], adapters: list[dict[str, torch.Tensor]], labels: list[str]) -> None:
    if not base:
        raise MergeError("the base holds no tensors")
    names = set(base)
    for label, state in zip(labels, adapters):
        if set(state) != names:
            missing, extra = sorted(names - set(state)), sorted(set(state) - names)
            raise MergeError(
                f"{label} does not hold the same tensors as the base's adapter blocks: {len(missing)} missing "
                f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); merge adapters of the same split"
            )
        for name, t in state.items():
            if tuple(t.shape) != tuple(base[name].shape):
                raise MergeError(
                    f"{label}: tensor {name!r} has shape {tuple(t.shape)}, the base has {tuple(base[name].shape)}"
                )
            if not torch.isfinite(t).all():
                raise MergeError(f"{label}: tensor {name!r} holds NaN or infinite values")


# --- the arithmetic ------------------------------------------------------------------


def task_vectors(
    base: dict[str, torch.Tensor], adapters: list[dict[str, torch.Tensor]], labels: list[str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """``adapter - base`` per tensor, in fp32 (checked: same names, shapes, finite values)."""
    labels = labels or [f"adapter {i + 1}" for i in range(len(adapters))]
    _check_states(base, adapters, labels)
    return [{n: state[n].float() - base[n].float() for n in base} for state in adapters]


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seeds keyed by name: DARE's drops do not depend on dict order.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def merge_tensor(deltas: list[torch.Tensor], cfg: MergeConfig, name: str = "") -> torch.Tensor:
    """One merged delta from one tensor's deltas (cfg already validated)."""
    from peft.utils.merge_utils import dare_linear, task_arithmetic, ties

    weights = torch.tensor(cfg.weights if cfg.weights is not None else [1.0] * len(deltas), dtype=torch.float32)
    if cfg.method == "average":
        return task_arithmetic(deltas, weights / weights.sum())
    if cfg.method == "task-arithmetic":
        return cfg.scale * task_arithmetic(deltas, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing; that is the request
        if cfg.method == "ties":
            return cfg.scale * ties(deltas, weights, cfg.density, cfg.majority_sign)
        # dare: peft drops with torch's global generator; fork it so a merge is reproducible
        # and leaves the caller's random state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_tensor_seed(cfg.seed, name))
            return cfg.scale * dare_linear(deltas, weights, 1.0 - cfg.drop_rate)


def merge_deltas(deltas: list[dict[str, torch.Tensor]], cfg: MergeConfig) -> dict[str, torch.Tensor]:
    """The merged task vector of `deltas` (each keyed by the same names)."""
    cfg.validate(len(deltas))
    return {name: merge_tensor([d[name] for d in deltas], cfg, name) for name in deltas[0]}


def merge_states(
    base: dict[str, torch.Tensor],
    adapters: list[dict[str, torch.Tensor]],
    cfg: MergeConfig,
    labels: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged adapter: ``base + merged task vector``, keyed like `base`, in the base's dtype."""
    cfg.validate(len(adapters))
    merged = merge_deltas(task_vectors(base, adapters, labels), cfg)
    return {n: (base[n].float() + merged[n]).to(base[n].dtype) for n in base}


def base_blocks(model: torch.nn.Module, family, names) -> dict[str, torch.Tensor]:
    """The base model's own tensors for `names` (adapter-block parameters), detached copies."""
    params = dict(model.named_parameters())
    out = {}
    for name in sorted(names):
        if name not in params:
            raise MergeError(f"adapter tensor {name!r} does not exist in the base model")
        if family.block_index(name) is None:
            raise MergeError(
                f"adapter tensor {name!r} is not inside a transformer block; adapters carry whole blocks only"
            )
        out[name] = params[name].detach().clone()
    return out


def merge_adapters(
    loaded,
    adapters: list[tuple[dict[str, torch.Tensor], dict[str, str]]],
    cfg: MergeConfig,
    labels: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Merge (state, metadata) adapters of `loaded`'s base model; returns the merged (state, metadata).

    Refuses, before any arithmetic, adapters made for another base (by digest, named),
    different tensor sets or shapes, non-finite values and a weight count that does not
    match. The metadata carries the base digest, the method and its hyper-parameters."""
    labels = labels or [f"adapter {i + 1}" for i in range(len(adapters))]
    cfg.validate(len(adapters))
    from .models import state_digest

    # The deltas are taken from `loaded`'s current weights: a model that already holds a
    # plugged-in adapter would silently shift every delta.
    if state_digest(loaded.model) != loaded.digest:
        raise MergeError(
            f"{loaded.model_id} no longer holds its base weights (an adapter was plugged in?); "
            "merge against a freshly loaded base model"
        )
    check_same_base([(meta or {}).get("base_model_digest", "") for _, meta in adapters], labels, loaded.digest)
    states = [state for state, _ in adapters]
    base = base_blocks(loaded.model, loaded.family, states[0])
    merged = merge_states(base, states, cfg, labels)
    meta = {"base_model_digest": loaded.digest, "merge": json.dumps(cfg.hyperparameters(), sort_keys=True)}
    return merged, meta
