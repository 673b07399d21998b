"""The Offsite-Tuning split: adapter = first `a` + last `b` blocks, emulator = the middle.

A `SplitPlan` records, for every block of the emulator model, which block of the original
model it came from (`layer_origin`). That list is the one source of truth for renaming
parameters between the two models, so plug-in and aggregation work by name and a dropped
block can never silently shift the adapter's position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from .families import Family

if TYPE_CHECKING:  # transformers' model classes cost ~140 MB of RSS to import; a client may not need them
    from transformers import PreTrainedModel

    from .models import LoadedModel


class SplitError(ValueError):
    """A split that the model cannot satisfy (too many layers, bad kept list, ...)."""


@dataclass
class SplitPlan:
    n_layers: int  # blocks in the original model
    bottom: list[int]  # original indices of the lower adapter blocks
    middle_kept: list[int]  # original indices of the middle blocks the emulator keeps
    top: list[int]  # original indices of the upper adapter blocks
    selection: str = field(default="uniform")  # how middle_kept was chosen: "all", "uniform" or "explicit"

    @property
    def layer_origin(self) -> list[int]:
        """Original block index of each emulator block, in emulator order."""
        return self.bottom + self.middle_kept + self.top

    @property
    def adapter_positions(self) -> list[int]:
        """Emulator block positions of the adapter (trainable) blocks."""
        n_bottom, n_mid = len(self.bottom), len(self.middle_kept)
        return list(range(n_bottom)) + list(range(n_bottom + n_mid, n_bottom + n_mid + len(self.top)))

    @property
    def emulator_positions(self) -> list[int]:
        """Emulator block positions of the (frozen, lossy) middle blocks."""
        return list(range(len(self.bottom), len(self.bottom) + len(self.middle_kept)))

    @property
    def adapter_origin(self) -> list[int]:
        return self.bottom + self.top

    @property
    def middle(self) -> list[int]:
        """All original middle block indices, kept or dropped."""
        return list(range(len(self.bottom), self.n_layers - len(self.top)))

    def role(self, position: int) -> str:
        return "adapter" if position in set(self.adapter_positions) else "emulator"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SplitPlan":
        plan = cls(
            n_layers=int(d["n_layers"]),
            bottom=[int(i) for i in d["bottom"]],
            middle_kept=[int(i) for i in d["middle_kept"]],
            top=[int(i) for i in d["top"]],
            selection=str(d.get("selection", "uniform")),
        )
        _check_plan(plan)
        return plan


def uniform_indices(n: int, k: int) -> list[int]:
    """The paper's rule: keep round(i*(n-1)/(k-1)) for i in 0..k-1 (first and last kept).

    Python's round (half to even) as in the reference code, so plans match it exactly."""
    if k <= 0:
        return []
    if k == 1:
        return [round((n - 1) / 2)]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def plan_split(
    n_layers: int,
    adapter_layers: tuple[int, int] | list[int] = (2, 2),
    emulator_layers: int | None = None,
    kept: list[int] | None = None,
) -> SplitPlan:
    """Split `n_layers` blocks into bottom adapter, kept middle, top adapter.

    `emulator_layers` keeps that many middle blocks by the uniform rule (None: all of them);
    `kept` names the original middle indices to keep instead (e.g. chosen by importance)."""
    if len(tuple(adapter_layers)) != 2:
        raise SplitError(f"adapter layers must be two numbers 'bottom,top' (e.g. 2,2), got {adapter_layers!r}")
    a, b = (int(x) for x in adapter_layers)
    if a < 0 or b < 0:
        raise SplitError(f"adapter layers must not be negative, got {a},{b}")
    if a + b == 0:
        raise SplitError("the adapter needs at least one block: use e.g. --adapter-layers 2,2")
    if a + b >= n_layers:
        raise SplitError(
            f"{a}+{b} adapter blocks leave no middle for the emulator: the model has only {n_layers} blocks; "
            f"use fewer adapter layers (at most {n_layers - 1} in total)"
        )
    middle = list(range(a, n_layers - b))
    if kept is not None:
        kept = [int(i) for i in kept]
        if emulator_layers is not None and emulator_layers != len(kept):
            raise SplitError(
                f"--emulator-layers {emulator_layers} disagrees with the {len(kept)} kept blocks listed; give one or the other"
            )
        bad = [i for i in kept if i not in middle]
        if bad:
            raise SplitError(
                f"kept blocks {bad} are not middle blocks: with adapter layers {a},{b} of {n_layers}, "
                f"the middle is blocks {middle[0]}..{middle[-1]}"
            )
        if len(set(kept)) != len(kept):
            raise SplitError(f"kept blocks {kept} list a block twice")
        middle_kept, selection = sorted(kept), "explicit"
    elif emulator_layers is None:
        middle_kept, selection = middle, "all"
    else:
        if emulator_layers < 0:
            raise SplitError(f"--emulator-layers must not be negative, got {emulator_layers}")
        if emulator_layers > len(middle):
            raise SplitError(
                f"{a}+{emulator_layers}+{b} layers asked for, but the model has only {n_layers} blocks "
                f"({len(middle)} middle blocks with adapter layers {a},{b}); use --emulator-layers at most {len(middle)}"
            )
        middle_kept = [middle[i] for i in uniform_indices(len(middle), emulator_layers)]
        selection = "all" if middle_kept == middle else "uniform"
    plan = SplitPlan(
        n_layers=n_layers,
        bottom=list(range(a)),
        middle_kept=middle_kept,
        top=list(range(n_layers - b, n_layers)),
        selection=selection,
    )
    _check_plan(plan)
    return plan


def _check_plan(plan: SplitPlan) -> None:
    origin = plan.layer_origin
    if origin != sorted(origin) or len(set(origin)) != len(origin) or any(not 0 <= i < plan.n_layers for i in origin):
        raise SplitError(f"invalid split plan: layer origin {origin} must be increasing indices below {plan.n_layers}")
    if plan.bottom != list(range(len(plan.bottom))) or plan.top != list(
        range(plan.n_layers - len(plan.top), plan.n_layers)
    ):
        raise SplitError(
            f"invalid split plan: adapters must be the first and last blocks, got {plan.bottom} and {plan.top}"
        )


# --- names -------------------------------------------------------------------------


def to_original_name(emulator_name: str, plan: SplitPlan, family: Family) -> str:
    """``model.layers.2.x`` in the emulator -> ``model.layers.{origin}.x``; other names unchanged."""
    pos = family.block_index(emulator_name)
    if pos is None:
        return emulator_name
    origin = plan.layer_origin
    if not 0 <= pos < len(origin):
        raise KeyError(f"{emulator_name!r}: the emulator has {len(origin)} blocks, no block {pos}")
    return family.rename_block(emulator_name, origin[pos])


def to_emulator_name(original_name: str, plan: SplitPlan, family: Family) -> str:
    """Inverse of `to_original_name`; KeyError for a block the emulator dropped."""
    index = family.block_index(original_name)
    if index is None:
        return original_name
    origin = plan.layer_origin
    try:
        pos = origin.index(index)
    except ValueError:
        raise KeyError(f"{original_name!r}: block {index} is not in the emulator (it keeps {origin})") from None
    return family.rename_block(original_name, pos)


# --- building the emulator model ---------------------------------------------------


def empty_model_like(config) -> PreTrainedModel:
    """A model of `config` with uninitialised weights (fast) and tied weights re-tied.

    Parameters are allocated but not initialised: every one is overwritten by the caller.
    Non-persistent buffers (rotary frequencies, causal masks) are computed in __init__,
    so they are correct."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model


def emulator_config(loaded: LoadedModel, plan: SplitPlan):
    family = loaded.family
    if family.num_layers(loaded.model.config) != plan.n_layers:
        raise SplitError(
            f"the plan is for {plan.n_layers} blocks but {loaded.model_id} has {family.num_layers(loaded.model.config)}"
        )
    return family.with_num_layers(loaded.model.config, len(plan.layer_origin), keep=plan.layer_origin)


@torch.no_grad()
def build_emulator_model(loaded: LoadedModel, plan: SplitPlan) -> PreTrainedModel:
    """The emulator + adapter model: blocks `plan.layer_origin` of the original, copied by name.

    Everything outside the blocks (embeddings, final norm, LM head) is copied unchanged.
    Every parameter and buffer of the new model must have a source in the original, or
    this fails instead of leaving random weights behind."""
    family = loaded.family
    if getattr(loaded.model.config, "scale_attn_by_inverse_layer_idx", False) and plan.layer_origin != list(
        range(plan.n_layers)
    ):
        # GPT-2 with this option scales attention by the block's position, so a block moved
        # to another position would compute something else.
        raise SplitError(
            "this GPT-2 config scales attention by layer index; dropping blocks would change the kept ones. Keep every middle block"
        )
    model = empty_model_like(emulator_config(loaded, plan))
    model.to(next(loaded.model.parameters()).device)
    source = dict(loaded.model.named_parameters(remove_duplicate=False))
    source.update(loaded.model.named_buffers(remove_duplicate=False))
    targets = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    missing = []
    for name, tensor in targets:
        src = source.get(to_original_name(name, plan, family))
        if src is None or src.shape != tensor.shape:
            missing.append(name)
            continue
        tensor.copy_(src)
    if missing:
        raise SplitError(
            f"the emulator has tensors without a matching original tensor: {missing[:5]} ({len(missing)} in all)"
        )
    model.eval()
    return model
