"""Measured importance of middle blocks: where low-bit weights cost protection, where fidelity.

An emulator has two jobs that pull apart: the adapter trained on it must transfer to the
full model (the emulator must give the adapter the *gradients* the full model would), and
the emulator alone must stay a poor model (protection). A block can matter for one and
not the other, so the probe measures both for a candidate per-block precision:

- `emulator_nll`: held-out loss of the emulator as shipped (higher protects more);
- `grad_cosine`: cosine between the adapter's gradient on the emulator and on the full
  model, summed over a few training batches, at the pretrained adapter (the direction the
  client's first steps take; 1.0 means the emulator teaches the adapter exactly what the
  full model would).

`probe_block_groups` lowers the precision of one group of blocks at a time on top of a
base precision, so the caller can spend low bits where they buy protection without
bending the adapter's gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .data import TokenBlocks
from .losses import causal_lm_nll, mean_nll
from .models import LoadedModel
from .quantize import dequantize_module, quantize_module
from .split import SplitPlan, build_emulator_model, plan_split


def _adapter_params(model, family, positions: list[int], origin: list[int]) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, p in model.named_parameters():
        idx = family.block_index(name)
        if idx is not None and idx in set(positions):
            out[family.rename_block(name, origin[idx])] = p
    return out


def adapter_gradient(model, family, positions: list[int], origin: list[int], batches) -> dict[str, torch.Tensor]:
    """Sum over `batches` of d(mean token NLL)/d(adapter params), keyed by original names."""
    params = _adapter_params(model, family, positions, origin)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    model.eval()  # no dropout: compare the two models' gradients, not noise
    for ids, labels, mask in batches:
        nll, n = causal_lm_nll(model, ids, labels, mask)
        (nll / max(n, 1)).backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return grads


def gradient_cosine(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    dot = sum(float((reference[k] * other[k]).sum()) for k in reference)
    n1 = math.sqrt(sum(float(reference[k].pow(2).sum()) for k in reference))
    n2 = math.sqrt(sum(float(other[k].pow(2).sum()) for k in reference))
    return dot / max(n1 * n2, 1e-30)


def quantized_emulator(
    loaded: LoadedModel,
    plan: SplitPlan,
    bits_for: Callable[[int], int | None],
    group_size: int = 64,
    act_scales: dict[str, torch.Tensor] | None = None,
    awq_alpha: float | None = 0.5,
    fold: bool = True,
):
    """The emulator of `plan` with middle block of original index i at `bits_for(i)` bits
    (None: fp32). `fold=True` folds the low-bit weights back into plain Linears (same
    function, faster for probing)."""
    emu = build_emulator_model(loaded, plan)
    blocks = loaded.family.get_blocks(emu)
    for pos in plan.emulator_positions:
        b = bits_for(plan.layer_origin[pos])
        if b is None:
            continue
        # act_scales are keyed by the full model's names (original block indices).
        quantize_module(
            blocks[pos],
            b,
            group_size,
            act_scales=act_scales,
            prefix=loaded.family.block_prefix(plan.layer_origin[pos]),
            awq_alpha=awq_alpha,
        )
    if fold:
        dequantize_module(emu)
    return emu


def probe_block_groups(
    loaded: LoadedModel,
    train: TokenBlocks,
    heldout: TokenBlocks,
    base_bits: int = 4,
    probe_bits: int = 2,
    groups: list[list[int]] | None = None,
    adapter_layers: tuple[int, int] = (2, 2),
    grad_batches: int = 3,
    eval_blocks: int = 8,
    batch_size: int = 4,
    act_scales: dict[str, torch.Tensor] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """For each group of middle blocks: emulator NLL and adapter-gradient cosine when that
    group drops from `base_bits` to `probe_bits` (all others at `base_bits`).

    Returns {"full": {...}, "base": {...}, "groups": [{"blocks", "emulator_nll", "grad_cosine"}, ...]}."""
    n = loaded.family.num_layers(loaded.model.config)
    plan = plan_split(n, adapter_layers)
    groups = groups or [[i] for i in plan.middle_kept]
    gen = torch.Generator().manual_seed(0)
    batches = list(train.batches(batch_size, generator=gen, shuffle=True))[:grad_batches]
    evalset = TokenBlocks(
        heldout.input_ids[:eval_blocks], heldout.labels[:eval_blocks], heldout.attention_mask[:eval_blocks]
    )
    full_origin = list(range(n))
    positions = plan.adapter_positions
    t0 = time.perf_counter()
    g_full = adapter_gradient(loaded.model, loaded.family, positions, full_origin, batches)
    out = {"full": {"emulator_nll": mean_nll(loaded.model, evalset), "grad_cosine": 1.0}, "groups": []}

    def measure(bits_for) -> dict:
        emu = quantized_emulator(loaded, plan, bits_for, act_scales=act_scales)
        g = adapter_gradient(emu, loaded.family, positions, plan.layer_origin, batches)
        return {"emulator_nll": mean_nll(emu, evalset), "grad_cosine": gradient_cosine(g_full, g)}

    out["base"] = measure(lambda i: base_bits)
    if log:
        log(
            f"full nll {out['full']['emulator_nll']:.4f}; base {base_bits}-bit {out['base']} ({time.perf_counter() - t0:.0f}s)"
        )
    for group in groups:
        members = set(group)
        r = measure(lambda i, members=members: probe_bits if i in members else base_bits)
        r["blocks"] = list(group)
        out["groups"].append(r)
        if log:
            log(
                f"blocks {group} at {probe_bits}-bit: nll {r['emulator_nll']:.4f} cos {r['grad_cosine']:.4f} ({time.perf_counter() - t0:.0f}s)"
            )
    return out
