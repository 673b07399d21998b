"""Choosing a scheme under a memory budget by contribution analysis (Tiny Training).

For each candidate unit (a block's norms, a fraction of its input channels, or the whole
block) we measure how much the loss drops when that unit alone trains for a few steps
(the probe), and estimate the memory it costs:

- own cost, analytic: trainable elements x (gradient + optimizer state [+ the new
  parameter itself]) plus, for channel slices, the gathered input columns autograd keeps;
- depth cost, measured once per candidate lowest block: bytes autograd saves for one
  micro-batch when backward reaches down to that block (saved-tensor hooks);
- fixed cost: the process's resident memory now (runtime, frozen weights, data) plus the
  chunked loss's workspace.

Gains are assumed additive (as in the paper); every combination (one weight option and
optionally norms per block) is scored exhaustively when there are few trainable blocks,
greedily otherwise, and the best total gain under the budget wins. The run's measured
peak RSS is reported next to the estimate, which is how the estimate is validated.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from offsite.emulators.data import TokenBlocks

from .config import TrainConfig
from .layers import input_features, is_linear, output_features
from .memory import MB, SavedActivations, current_rss_mb
from .pruning import store_frozen_adapter_fp16, train_in_fp32
from .schemes import BlockScheme, SchemePlan, _is_norm, apply_scheme, channel_target_names
from .stepper import Stepper, make_optimizer

CHANNEL_FRACTIONS = (0.25, 0.5)
# "auto" budget: the minimum measured on this machine at run time (its own runtime floor,
# frozen weights and data) plus this much room for the update. A constant budget tuned on
# one machine trips "below the minimum" on another whose runtime floor is higher.
AUTO_MARGIN_MB = 64.0
WEIGHT_OPTIONS = (None, *(f"channels:{r:g}" for r in CHANNEL_FRACTIONS), "full")


class BudgetError(ValueError):
    """The memory budget cannot be met; the message states the minimum."""


@dataclass
class Unit:
    block: int
    kind: str  # "norms", "channels:R" or "full"
    own_mb: float
    gain: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.block}:{self.kind}"


@dataclass
class BudgetChoice:
    spec: str
    budget_mb: float
    estimate_mb: float
    minimum_mb: float
    fixed_mb: float
    depth_mb: dict[int, float]
    units: list[Unit]
    chosen: list[str]
    loss_probe_before: float
    probe_seconds: float
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "spec": self.spec,
            "budget_mb": self.budget_mb,
            "estimate_mb": round(self.estimate_mb, 1),
            "minimum_mb": round(self.minimum_mb, 1),
            "fixed_mb": round(self.fixed_mb, 1),
            "depth_mb": {str(k): round(v, 1) if math.isfinite(v) else None for k, v in self.depth_mb.items()},
            "units": [
                {
                    "unit": u.name,
                    "gain": u.gain if math.isfinite(u.gain) else None,
                    "own_mb": round(u.own_mb, 2),
                    "chosen": u.name in self.chosen,
                }
                for u in self.units
            ],
            "loss_probe_before": self.loss_probe_before,
            "probe_seconds": round(self.probe_seconds, 2),
            "reasons": self.reasons,
        }


def parse_memory(text: str | float | int) -> float | str:
    """'600MB', '1.5GB', '600' -> megabytes (MiB); 'auto' stays "auto"."""
    if isinstance(text, (int, float)):
        return float(text)
    if text.strip().lower() == "auto":
        return "auto"
    s = text.strip().upper().replace(" ", "")
    for suffix, mult in (("GIB", 1024), ("GB", 1024), ("G", 1024), ("MIB", 1), ("MB", 1), ("M", 1)):
        if s.endswith(suffix):
            s, factor = s[: -len(suffix)], mult
            break
    else:
        factor = 1
    try:
        value = float(s) * factor
    except ValueError:
        raise BudgetError(f"memory budget {text!r} is not a size; write e.g. 600MB or 1.5GB") from None
    if value <= 0:
        raise BudgetError(f"memory budget must be positive, got {text!r}")
    return value


# --- memory ---------------------------------------------------------------------------


def unit_own_bytes(block: torch.nn.Module, kind: str, cfg: TrainConfig, tokens: int, act_bytes: int) -> int:
    opt = 8 if cfg.optimizer == "adamw" else 0
    per_existing = 4 + opt  # gradient + optimizer state; the weight itself exists anyway
    per_new = 4 + per_existing
    if kind == "full":
        n = sum(p.numel() for p in block.parameters())
        return n * (per_existing + (2 if act_bytes == 2 else 0))  # + autocast's bf16 weight copy
    if kind == "norms":
        total = 0
        for _, m in block.named_modules():
            if _is_norm(m):
                total += sum(p.numel() for p in m.parameters(recurse=False)) * per_existing
            elif is_linear(m) and m.bias is not None:
                total += output_features(m) * per_existing
        return total
    if kind.startswith("channels:"):
        r = float(kind.split(":")[1])
        total = 0
        for name in channel_target_names(block, cfg.channel_targets):
            m = block.get_submodule(name)
            k = max(1, min(input_features(m), round(r * input_features(m))))
            total += output_features(m) * k * per_new + tokens * k * act_bytes
        return total
    raise ValueError(kind)


def loss_workspace_bytes(vocab: int, cfg: TrainConfig, act_bytes: int) -> int:
    if cfg.fused_head_loss:  # one chunk's logits and their fp32 copy; softmax and its gradient reuse them
        return cfg.loss_chunk_tokens * vocab * (act_bytes + 4)
    # checkpointed chunks: logits, fp32 copy, log-softmax and its gradient
    return cfg.loss_chunk_tokens * vocab * (act_bytes + 4 + 4 + 4)


# --- the analysis ---------------------------------------------------------------------


def _probe_batches(train: TokenBlocks, cfg: TrainConfig) -> tuple[list, tuple]:
    bs = 1  # a probe compares units; one block keeps it cheap
    g = torch.Generator().manual_seed(cfg.seed + 17)
    order = torch.randperm(len(train), generator=g)
    need = bs * (cfg.probe_batches + 1)
    idx = order.repeat(math.ceil(need / len(train)))[:need]
    batches = [(train.input_ids[i], train.labels[i], train.attention_mask[i]) for i in idx.split(bs)]
    return batches[:-1], batches[-1]


def choose_scheme(
    target,
    train: TokenBlocks,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> BudgetChoice:
    """Pick the scheme with the largest measured loss drop that fits `cfg.memory_budget_mb`."""
    model, family, positions = target.model, target.family, sorted(target.trainable_blocks)
    auto = cfg.memory_budget_mb == "auto"
    budget = math.inf if auto else float(cfg.memory_budget_mb)
    blocks = family.get_blocks(model)
    act_bytes = 2 if dtype == torch.bfloat16 else 4
    tokens = cfg.batch_size * cfg.block_size
    vocab = model.get_output_embeddings().weight.shape[0]
    fixed_mb = current_rss_mb() + loss_workspace_bytes(vocab, cfg, act_bytes) / MB

    units = [
        Unit(p, kind, unit_own_bytes(blocks[p], kind, cfg, tokens, act_bytes) / MB)
        for p in positions
        for kind in ("norms", *WEIGHT_OPTIONS[1:])
    ]
    by_name = {u.name: u for u in units}

    # depth cost: what backward down to block l keeps, measured on one sequence and scaled
    # to the micro-batch (activations grow linearly with it), so the analysis itself stays small
    train_batch = (train.input_ids[:1], train.labels[:1], train.attention_mask[:1])
    # Top block first: depth only grows downwards, so once it alone breaks the budget the
    # lower blocks are out too and are not measured (measuring them would itself cost memory).
    depth_mb: dict[int, float] = {}
    for p in sorted(positions, reverse=True):
        if auto and depth_mb and math.isinf(budget):  # the top block gives the minimum: depth grows downwards
            top = max(depth_mb)
            budget = fixed_mb + depth_mb[top] + min(u.own_mb for u in units if u.block == top) + AUTO_MARGIN_MB
        if depth_mb:
            # Every block from p up saves about what the top block alone saves: when that much
            # already breaks the budget, p is out, and measuring it would itself cost that much
            # (a 30-block emulator's bottom block: ~350 MB for the one-sequence measurement).
            top = max(depth_mb)
            if fixed_mb + max(max(depth_mb.values()), depth_mb[top] * (top - p + 1)) > budget:
                depth_mb[p] = math.inf
                continue
        applied = apply_scheme(
            model, family, SchemePlan({p: BlockScheme(norms=True)}), cfg.channel_targets, snapshot=True
        )
        try:
            train_in_fp32([q for _, q in applied.trainable_parameters()])
            with SavedActivations(exclude=model) as saved:
                nll, _ = Stepper(model, family, applied, cfg, device, dtype).loss_sum(*train_batch)
            del nll
        finally:
            _undo(applied, dtype)
        # scaled to the whole micro-batch even when the step takes it a sequence per pass
        # (cfg.sequences_per_pass): an estimate that errs high, never below what a pass keeps
        depth_mb[p] = saved.bytes * cfg.batch_size / MB * (1 if not cfg.activation_checkpointing else 0.25)

    def estimate(selection: dict[int, tuple[bool, str | None]]) -> float:
        chosen = [p for p, (n, w) in selection.items() if n or w]
        if not chosen:
            return math.inf
        own = sum(by_name[f"{p}:norms"].own_mb for p, (n, w) in selection.items() if n and w != "full")
        own += sum(by_name[f"{p}:{w}"].own_mb for p, (_, w) in selection.items() if w)
        return fixed_mb + depth_mb[min(chosen)] + own

    options = [(n, w) for w in WEIGHT_OPTIONS for n in (False, True) if not (n and w == "full")]
    minimum = min(estimate({p: opt}) for p in positions for opt in options if opt != (False, None))
    if auto:
        budget = minimum + AUTO_MARGIN_MB
        log(
            f"memory budget auto: {budget:.0f} MB (the minimum measured here, {minimum:.0f} MB, plus {AUTO_MARGIN_MB:.0f} MB)"
        )
    if budget < minimum:
        raise BudgetError(
            f"memory budget {budget:.0f} MB is below the minimum for this model and data: {math.ceil(minimum)} MB "
            f"(runtime, frozen weights and data {fixed_mb:.0f} MB, plus the cheapest update); "
            f"pass --memory-budget {math.ceil(minimum)}MB or more, or lower --batch-size/--block-size"
        )

    # contribution: loss drop on a held-back probe batch after a few steps of each unit alone
    started = time.perf_counter()
    probe_train, probe_eval = _probe_batches(train, cfg)
    with torch.no_grad():
        before_nll, before_n = _eval_loss(model, family, cfg, device, dtype, probe_eval, positions)
    for u in units:
        alone = {u.block: (u.kind == "norms", None if u.kind == "norms" else u.kind)}
        if estimate(alone) > budget:  # cannot be chosen: do not spend time (or memory) probing it
            u.gain = -math.inf
            continue
        plan = SchemePlan({u.block: _block_scheme(u.kind)})
        applied = apply_scheme(model, family, plan, cfg.channel_targets, snapshot=True)
        try:
            params = [p for _, p in applied.trainable_parameters()]
            train_in_fp32(params)
            opt = make_optimizer(params, cfg)
            stepper = Stepper(model, family, applied, cfg, device, dtype)
            for s in range(cfg.probe_steps):
                stepper.step([probe_train[s % len(probe_train)]])
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                after_nll, after_n = _eval_loss(model, family, cfg, device, dtype, probe_eval, positions)
            u.gain = before_nll / max(before_n, 1) - after_nll / max(after_n, 1)
            del opt, params, stepper
        finally:
            _undo(applied, dtype)
    probe_seconds = time.perf_counter() - started

    gains = {u.name: u.gain for u in units}

    def total_gain(selection):
        g = 0.0
        for p, (n, w) in selection.items():
            if w:
                g += gains[f"{p}:{w}"]
            if n and w != "full":
                g += gains[f"{p}:norms"]
        return g

    # The floor of every choice: the top block in full, whenever it fits. A few probe steps rank a
    # whole block below its norms or a slice of its channels (Adam moves every weight by about the
    # learning rate from the first step, which one held-back batch reads as noise), yet over a run
    # it is the update that moves held-out text. Shipped int4-awq-prune10 bundle, 6 steps: `29:full`
    # took held-out perplexity 19.39 -> 18.19; the probes' own pick, `28:norms,28:channels:0.25`,
    # 19.39 -> 19.27; `norms,channels:0.5` on both top blocks 19.00 (bench.client_train data).
    top = max(positions)
    floor = top if estimate({top: (False, "full")}) <= budget else None

    def candidates():
        if len(options) ** len(positions) <= 200_000:
            return (dict(zip(positions, combo)) for combo in itertools.product(options, repeat=len(positions)))
        greedy = _greedy_candidates(positions, options, gains, estimate, budget)
        return greedy if floor is None else (s | {top: (False, "full")} for s in greedy)

    def pick(floor):
        best, best_gain = None, -math.inf
        for selection in candidates():
            cost = estimate(selection)
            if cost > budget or (floor is not None and selection.get(floor) != (False, "full")):
                continue
            g = total_gain(selection)
            if g > best_gain or (g == best_gain and best is not None and cost < estimate(best)):
                best, best_gain = selection, g
        return best, best_gain

    best, best_gain = pick(floor)
    if best is None:
        floor = None
        best, best_gain = pick(None)
    assert best is not None  # the minimum fits, so something does
    plan = SchemePlan({p: _block_scheme_from(n, w) for p, (n, w) in best.items() if n or w})
    chosen = [f"{p}:norms" for p, (n, w) in best.items() if n and w != "full"] + [
        f"{p}:{w}" for p, (_, w) in best.items() if w
    ]
    est = estimate(best)
    choice = BudgetChoice(
        plan.spec(),
        budget,
        est,
        minimum,
        fixed_mb,
        depth_mb,
        units,
        chosen,
        before_nll / max(before_n, 1),
        probe_seconds,
    )
    choice.reasons = _explain(choice, units, best_gain, floor)
    for line in choice.reasons:
        log(line)
    return choice


def _undo(applied, dtype: torch.dtype) -> None:
    """Undo a probe's scheme, and put the frozen adapter back in fp16 as the trainer keeps it."""
    applied.undo()
    if dtype != torch.float32:
        store_frozen_adapter_fp16(applied.model, applied.family, sorted(applied.plan.blocks))


def _eval_loss(model, family, cfg, device, dtype, batch, positions) -> tuple[float, int]:
    from offsite.emulators.losses import causal_lm_nll

    from .pruning import autocast

    ids, labels, mask = (t.to(device) for t in batch)
    with autocast(device, dtype):
        nll, n = causal_lm_nll(model, ids, labels, mask, cfg.loss_chunk_tokens)
    return float(nll), n


def _block_scheme(kind: str) -> BlockScheme:
    if kind == "norms":
        return BlockScheme(norms=True)
    if kind == "full":
        return BlockScheme(full=True)
    return BlockScheme(channels=float(kind.split(":")[1]))


def _block_scheme_from(norms: bool, weight: str | None) -> BlockScheme:
    b = _block_scheme(weight) if weight else BlockScheme()
    if norms and not b.full:
        b.norms = True
    return b


def _greedy_candidates(positions, options, gains, estimate, budget):
    """Many trainable blocks: for each lowest block, add the best gain-per-MB options greedily."""
    for low in positions:
        selection = {p: (False, None) for p in positions}
        ranked = sorted(
            ((gains[f"{p}:{w}"] if w else 0) + (gains[f"{p}:norms"] if n and w != "full" else 0), p, (n, w))
            for p in positions
            if p >= low
            for (n, w) in options
            if (n, w) != (False, None)
        )
        for g, p, opt in sorted(ranked, reverse=True):
            if g <= 0:
                break
            trial = {**selection, p: opt}
            if selection[p] == (False, None) and estimate(trial) <= budget:
                selection = trial
        yield selection


def _explain(choice: BudgetChoice, units: list[Unit], gain: float, floor: int | None) -> list[str]:
    lines = [
        f"memory budget {choice.budget_mb:.0f} MB: fixed {choice.fixed_mb:.0f} MB (runtime, frozen weights, data, loss workspace); "
        f"minimum {choice.minimum_mb:.0f} MB",
        "backward depth cost (MB) by lowest trainable block: "
        + ", ".join(
            f"{k}: {v:.0f}" if math.isfinite(v) else f"{k}: over budget, not measured"
            for k, v in sorted(choice.depth_mb.items())
        ),
        f"{'unit':<18}{'loss drop':>11}{'MB':>9}  chosen",
    ]
    for u in sorted(units, key=lambda u: (-u.block, u.kind)):
        drop = "too big" if u.gain == -math.inf else f"{u.gain:.4f}"
        lines.append(f"{u.name:<18}{drop:>11}{u.own_mb:>9.1f}  {'yes' if u.name in choice.chosen else ''}")
    first = f"block {floor} in full (it fits), then " if floor is not None else ""
    lines.append(
        f"chose {choice.spec!r}: {first}the largest summed probe loss drop ({gain:.4f}) whose estimate "
        f"({choice.estimate_mb:.0f} MB) fits the budget ({choice.probe_seconds:.1f} s of probes)"
    )
    return lines
