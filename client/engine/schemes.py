"""Update schemes: which parameters of which adapter blocks train, and how.

Spec syntax (comma-separated entries, each ``[SELECTOR:]KIND``)::

    KIND      full | norms | bias | channels:R | lora:R | frozen
    SELECTOR  all (default) | top | bottom | topN | bottomN | N (a model block index)

- ``full``: every weight of the block.
- ``norms``: norm gains and biases, and the linears' biases where the family has them.
- ``bias``: the linears' biases; where the family has none (Llama), zero-initialised
  biases are added and trained (Tiny Training's bias update). ``norms,bias`` is the
  whole Tiny Training "norms + biases" unit. Added biases are not parameters of the base
  model: they appear in the adapter state as ``<linear>.bias`` and in
  ``metrics["added_biases"]``, and plug-in by original name rejects them, which is why
  they are opt-in and never chosen by the memory budget.
- ``channels:R``: a fraction R (0 < R <= 1) of the input channels of the block's input
  projections (q/k/v/gate/up, GPT-2 c_attn/c_fc, OPT fc1), chosen by weight norm, trained
  as a sliced delta (layers.ChannelDelta); folded into the weight on export.
- ``lora:R``: peft LoRA of rank R on every linear of the block; merged on export.
- ``frozen``: nothing in the block trains (use it to carve blocks out of a selector).

``top``/``bottom`` are the highest/lowest run of consecutive trainable blocks (for an
emulator: the top and bottom adapter blocks); with a single run, its upper/lower half.
``topN``/``bottomN`` are the last/first N trainable blocks. Later entries add to earlier
ones for the same block; ``full`` makes the others moot. Shorthands: ``top`` = ``top:full``,
``bottom`` = ``bottom:full``.

Examples: ``full``, ``top``, ``top:full,bottom:norms``, ``norms,top1:channels:0.25``, ``lora:8``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from offsite.emulators.families import Family

from .layers import ChannelDelta, is_linear, output_features

KINDS = ("full", "norms", "bias", "channels", "lora", "frozen")
INPUT_PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "gate_proj",
    "up_proj",
    "c_attn",
    "c_fc",
    "fc1",
    "query_key_value",
    "qkv_proj",
    "gate_up_proj",
    "W_pack",
)


class SchemeError(ValueError):
    """A scheme spec that cannot be parsed or applied; the message shows the valid syntax."""


SYNTAX = (
    "use comma-separated [SELECTOR:]KIND entries, KIND one of full, norms, channels:R (0<R<=1), "
    "lora:R (rank), bias, frozen; SELECTOR one of all, top, bottom, topN, bottomN, or a block index; "
    "e.g. 'top:full,bottom:norms'"
)


@dataclass
class BlockScheme:
    full: bool = False
    norms: bool = False
    bias: bool = False
    channels: float | None = None
    lora: int | None = None

    @property
    def trains(self) -> bool:
        return self.full or self.norms or self.bias or self.channels is not None or self.lora is not None

    def spec(self) -> list[str]:
        if self.full:
            return ["full"]
        out = []
        if self.norms:
            out.append("norms")
        if self.bias:
            out.append("bias")
        if self.channels is not None:
            out.append(f"channels:{self.channels:g}")
        if self.lora is not None:
            out.append(f"lora:{self.lora}")
        return out


@dataclass
class SchemePlan:
    blocks: dict[int, BlockScheme]  # model block index -> what trains there

    def spec(self) -> str:
        """A canonical spec that reproduces this plan (block indices made explicit)."""
        parts = [f"{i}:{k}" for i, b in sorted(self.blocks.items()) for k in b.spec()]
        return ",".join(parts) if parts else "frozen"

    @property
    def trainable_blocks(self) -> list[int]:
        return sorted(i for i, b in self.blocks.items() if b.trains)


def _runs(positions: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def resolve_selector(selector: str, positions: list[int]) -> list[int]:
    positions = sorted(positions)
    runs = _runs(positions)
    if selector == "all":
        return positions
    if selector in ("top", "bottom"):
        if len(runs) > 1:
            return runs[-1] if selector == "top" else runs[0]
        half = len(positions) // 2
        return positions[half:] if selector == "top" else positions[: max(half, 1)]
    m = re.fullmatch(r"(top|bottom)(\d+)", selector)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= len(positions):
            raise SchemeError(f"selector {selector!r}: there are {len(positions)} trainable blocks")
        return positions[-n:] if m.group(1) == "top" else positions[:n]
    if selector.isdigit():
        if int(selector) not in positions:
            raise SchemeError(f"block {selector} is not trainable here; trainable blocks: {positions}")
        return [int(selector)]
    raise SchemeError(f"unknown selector {selector!r}; {SYNTAX}")


def parse_scheme(spec: str, positions: list[int]) -> SchemePlan:
    """Parse a spec against the trainable block positions (see module docstring)."""
    if not positions:
        raise SchemeError("the model has no trainable blocks")
    blocks = {p: BlockScheme() for p in sorted(positions)}
    entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
    if not entries:
        raise SchemeError(f"empty scheme; {SYNTAX}")
    for entry in entries:
        parts = entry.split(":")
        if parts[0] in KINDS:
            selector, kind = "all", parts
        elif len(parts) == 1:  # "top" alone means the whole top blocks
            selector, kind = parts[0], ["full"]
        else:
            selector, kind = parts[0], parts[1:]
        name, args = kind[0], kind[1:]
        targets = resolve_selector(selector, positions)
        if name not in KINDS:
            raise SchemeError(f"unknown kind {name!r} in {entry!r}; {SYNTAX}")
        if name in ("channels", "lora") and len(args) != 1 or name not in ("channels", "lora") and args:
            raise SchemeError(f"bad arguments in {entry!r}; {SYNTAX}")
        for p in targets:
            b = blocks[p]
            if name == "full":
                b.full = True
            elif name == "norms":
                b.norms = True
            elif name == "bias":
                b.bias = True
            elif name == "frozen":
                blocks[p] = BlockScheme()
            elif name == "channels":
                try:
                    r = float(args[0])
                except ValueError:
                    raise SchemeError(f"channels fraction {args[0]!r} is not a number; e.g. channels:0.25") from None
                if not 0 < r <= 1:
                    raise SchemeError(f"channels fraction must be in (0, 1], got {r}")
                b.channels = r
            elif name == "lora":
                if not args[0].isdigit() or int(args[0]) < 1:
                    raise SchemeError(f"lora rank must be a positive integer, got {args[0]!r}; e.g. lora:8")
                b.lora = int(args[0])
    for p, b in blocks.items():
        if b.full:
            blocks[p] = BlockScheme(full=True)
        elif b.channels is not None and b.lora is not None:
            raise SchemeError(f"block {p}: channels and lora both wrap the same linears; choose one")
    plan = SchemePlan({p: b for p, b in blocks.items() if b.trains})
    if not plan.blocks:
        raise SchemeError(f"scheme {spec!r} trains nothing; {SYNTAX}")
    return plan


# --- applying a plan to a model -------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _set_child(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@dataclass
class AppliedScheme:
    """A plan applied to a model; `finalize()` folds everything back into plain weights."""

    model: nn.Module
    family: Family
    plan: SchemePlan
    added_biases: list[str] = field(default_factory=list)  # module names given a new bias
    channel_modules: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    snapshot: dict[str, torch.Tensor] | None = None  # pre-training values, for undo()

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    @property
    def lowest_block(self) -> int:
        """The lowest block with a trainable parameter: backward stops there."""
        blocks = {self.family.block_index(n) for n, _ in self.trainable_parameters()}
        blocks.discard(None)
        if not blocks:
            raise SchemeError("nothing trains: the scheme selected no parameters")
        return min(blocks)

    def finalize(self) -> None:
        """Fold channel deltas into weights, merge LoRA, freeze everything (added biases stay)."""
        for name in self.channel_modules:
            _set_child(self.model, name, self.model.get_submodule(name).fold())
        for name in self.lora_modules:
            module = self.model.get_submodule(name)
            module.merge()
            _set_child(self.model, name, module.get_base_layer())
        self.channel_modules, self.lora_modules = [], []
        _drop_peft_marks(self.model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def undo(self) -> None:
        """Restore the model as it was before `apply_scheme` (used by contribution probes)."""
        for name in self.channel_modules:
            _set_child(self.model, name, self.model.get_submodule(name).base)
        for name in self.lora_modules:
            _set_child(self.model, name, self.model.get_submodule(name).get_base_layer())
        for name in self.added_biases:  # after unwrapping, so the name is the plain linear
            self.model.get_submodule(name).register_parameter("bias", None)
        params = dict(self.model.named_parameters())
        for name, value in (self.snapshot or {}).items():
            params[name].copy_(value)
        self.channel_modules, self.lora_modules, self.added_biases = [], [], []
        _drop_peft_marks(self.model)
        self.model.requires_grad_(False)


def _drop_peft_marks(model: nn.Module) -> None:
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)


def channel_target_names(block: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    wanted = targets or INPUT_PROJECTIONS
    names = [n for n, m in block.named_modules() if is_linear(m) and n.rpartition(".")[2] in wanted]
    if not names:  # an unknown layout: every linear is a candidate
        names = [n for n, m in block.named_modules() if is_linear(m)]
    return names


def apply_scheme(
    model: nn.Module,
    family: Family,
    plan: SchemePlan,
    channel_targets: tuple[str, ...] | None = None,
    lora_alpha_ratio: float = 2.0,
    snapshot: bool = False,
) -> AppliedScheme:
    """Freeze the model, then make trainable exactly what `plan` says."""
    model.requires_grad_(False)
    applied = AppliedScheme(model=model, family=family, plan=plan)
    blocks = family.get_blocks(model)
    in_place: list[str] = []  # existing parameters that will be trained in place

    lora = {p: b.lora for p, b in plan.blocks.items() if b.lora is not None}
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        targets = {}
        for p, rank in lora.items():
            prefix = family.block_prefix(p)
            for n, m in blocks[p].named_modules():
                if is_linear(m):
                    targets[prefix + n] = rank
        first = next(iter(targets.values()))
        config = LoraConfig(
            r=first,
            lora_alpha=int(lora_alpha_ratio * first),
            lora_dropout=0.0,
            target_modules=list(targets),
            rank_pattern={k: v for k, v in targets.items() if v != first},
            alpha_pattern={k: int(lora_alpha_ratio * v) for k, v in targets.items() if v != first},
            fan_in_fan_out=family.name == "gpt2",
        )
        inject_adapter_in_model(config, model)  # also freezes every non-LoRA parameter
        applied.lora_modules = list(targets)

    for p, b in sorted(plan.blocks.items()):
        block = blocks[p]
        prefix = family.block_prefix(p)
        if b.full:
            in_place += [prefix + n for n, _ in block.named_parameters()]
            block.requires_grad_(True)
            continue
        if b.norms or b.bias:
            for mname, m in block.named_modules():
                if _is_norm(m) and b.norms:
                    for pname, param in m.named_parameters(recurse=False):
                        param.requires_grad_(True)
                        in_place.append(f"{prefix}{mname}.{pname}")
                elif is_linear(m) and ".lora_" not in f".{mname}":
                    if m.bias is None and b.bias:
                        m.bias = nn.Parameter(torch.zeros(output_features(m), dtype=m.weight.dtype))
                        # the name the bias has once LoRA wrappers are gone
                        applied.added_biases.append(prefix + mname.removesuffix(".base_layer"))
                    elif m.bias is not None:
                        m.bias.requires_grad_(True)
                        in_place.append(f"{prefix}{mname}.bias")
        if b.channels is not None:
            for mname in channel_target_names(block, channel_targets):
                wrapped = ChannelDelta.top_channels(block.get_submodule(mname), b.channels)
                _set_child(block, mname, wrapped)
                applied.channel_modules.append(prefix + mname)
    if snapshot:
        params = dict(model.named_parameters())
        applied.snapshot = {n: params[n].detach().clone() for n in in_place if n in params}
    return applied
