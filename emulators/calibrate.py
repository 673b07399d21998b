"""Calibration for the low-bit format, run only by the model owner at build time.

- AWQ-style activation-aware scaling: input channels that see large activations are
  scaled up by ``s = mean|x| ** alpha`` before rounding (so they get a finer grid), and
  inputs are divided by ``s`` at run time, which leaves the product unchanged up to
  rounding. ``alpha`` is fixed or searched per layer.
- GPTQ error-compensating rounding from the layers' input second moments.

Both read statistics of the model's own activations on calibration text; the result is
stored in the format of `lowbit` (which is all a client ever loads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from .lowbit import (
    DEFAULT_GROUP_SIZE,
    QuantizationError,
    QuantLinear,
    _check_bits,
    _linear_children,
    _rtn,
    effective_group_size,
    quantize_weight,
)

AWQ_ALPHA_GRID = tuple(i / 10 for i in range(11))  # 0.0 (no scaling) ... 1.0


def gptq_quantize_weight(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022): round columns left to right and push each column's
    rounding error onto the columns not yet rounded, weighted by the inverse of the input
    second moment `hessian` (E[x x^T], [in, in]), so the layer's *output* error on that
    input distribution is what gets minimised rather than the weight error.

    Same result layout as `quantize_weight` (asymmetric groups of `group_size` columns,
    fp16 scales/zeros chosen when the group is reached, from the error-updated weights).
    `damp` adds that fraction of the mean diagonal to H so it can be inverted.
    """
    _check_bits(bits)
    out_f, in_f = w.shape
    if in_f % group_size:
        raise QuantizationError(f"group size {group_size} does not divide the input width {in_f}")
    if hessian.shape != (in_f, in_f):
        raise QuantizationError(
            f"hessian of shape {tuple(hessian.shape)} does not fit a weight with {in_f} input channels"
        )
    qmax = (1 << bits) - 1
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs never seen: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(in_f, dtype=H.dtype, device=H.device) * (damp * float(torch.diag(H).mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    n_groups = in_f // group_size
    scales = torch.zeros(out_f, n_groups, dtype=torch.float16, device=W.device)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.float16, device=W.device)
    # whole groups per lazy block, so a group's range is read after all earlier updates
    block = group_size * max(1, block_size // group_size)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                _c, s16, z16 = _rtn(W1[:, i : i + group_size].unsqueeze(1), qmax, 1.0)
                scales[:, col // group_size] = s16[:, 0]
                zeros[:, col // group_size] = z16[:, 0]
                s, z = s16[:, 0].float(), z16[:, 0].float()
            c = torch.round(W1[:, i] / s + z).clamp(0, qmax)
            codes[:, col] = c.to(torch.uint8)
            e = (W1[:, i] - (c - z) * s) / h1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros


# --- calibration statistics --------------------------------------------------------------


@torch.no_grad()
def _input_statistics(
    model: nn.Module,
    blocks,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    module_filter: Callable[[str], bool] | None,
    max_blocks: int | None,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of `reduce(x)` for the input rows x (tokens x features)
    of every nn.Linear whose name passes `module_filter`; padding positions are ignored.
    Keys are the linear layers' names in `model`."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current_mask: list[torch.Tensor | None] = [None]
    hooks = []

    def hook_for(name: str):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().float()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + reduce(x)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (module_filter is None or module_filter(name)):
            hooks.append(mod.register_forward_hook(hook_for(name)))
    if not hooks:
        raise QuantizationError("no nn.Linear layer matched the filter; nothing to calibrate")
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for ids, _labels, mask in blocks.batches(batch_size, shuffle=False):
            if max_blocks is not None and seen >= max_blocks:
                break
            if max_blocks is not None:
                ids, mask = ids[: max_blocks - seen], mask[: max_blocks - seen]
            current_mask[0] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            seen += ids.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


def collect_input_hessians(
    model: nn.Module,
    blocks,
    module_filter: Callable[[str], bool] | None = None,
    max_blocks: int | None = 16,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """E[x x^T] over the input tokens of every nn.Linear whose name passes `module_filter`
    (padding ignored), over the first `max_blocks` calibration blocks: GPTQ's statistics.
    Layers that read the same input (q/k/v, gate/up) get equal matrices."""
    return _input_statistics(model, blocks, lambda x: x.T @ x, module_filter, max_blocks, batch_size)


# --- AWQ statistics and scale search -----------------------------------------------


def collect_act_scales(
    model: nn.Module,
    blocks,
    module_filter: Callable[[str], bool] | None = None,
    max_blocks: int | None = 16,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of every nn.Linear whose name passes `module_filter`,
    over the first `max_blocks` calibration blocks (a `TokenBlocks`). Keys are the linear
    layers' names in `model`; padding positions are ignored."""
    return _input_statistics(model, blocks, lambda x: x.abs().sum(dim=0), module_filter, max_blocks, batch_size)


def awq_input_scale(
    weight: torch.Tensor,
    act_mean_abs: torch.Tensor,
    bits: int,
    group_size: int,
    alpha: float | None = 0.5,
) -> torch.Tensor:
    """Per-input-channel scale s = mean|x| ** alpha, normalised so that sqrt(max*min) = 1.

    With `alpha=None` the exponent is searched over 0.0..1.0 per layer, minimising the
    output error estimated from the activation statistics:
    sum_j E[x_j]^2 * ||(Q(W s)/s - W)[:, j]||^2 (a diagonal proxy: it needs only the
    per-channel statistics, not stored calibration activations). alpha=0 is plain RTN,
    so the search never does worse than no scaling on this proxy.
    """
    a = act_mean_abs.detach().float().to(weight.device).clamp(min=1e-5)
    w = weight.detach().float()

    def scale_for(alpha_: float) -> torch.Tensor:
        s = a.pow(alpha_)
        return s / (s.max() * s.min()).sqrt()

    if alpha is not None:
        return scale_for(alpha)
    g = effective_group_size(w.shape[1], bits, group_size)
    best_s, best_err = None, math.inf
    for alpha_ in AWQ_ALPHA_GRID:
        s = scale_for(alpha_)
        codes, scales, zeros = quantize_weight(w * s, bits, g)
        deq = (codes.view(w.shape[0], -1, g).float() - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
        err = float((((deq.view_as(w) / s) - w).pow(2) * a.pow(2)).sum())
        if err < best_err:
            best_s, best_err = s, err
    return best_s


# --- whole layers and modules -----------------------------------------------------------------


def quantize_linear(
    linear: nn.Linear,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    input_scale: torch.Tensor | None = None,
    clip_search: bool = False,
    hessian: torch.Tensor | None = None,
) -> QuantLinear:
    """`QuantLinear.from_linear`, with GPTQ rounding when `hessian` (E[x x^T] of the layer's
    input, from `collect_input_hessians`) is given."""
    rounding = None
    if hessian is not None:
        h = hessian.detach().float().to(linear.weight.device)
        if input_scale is not None:
            # the rounded weight sees x / s, whose second moment is H / (s s^T)
            s = input_scale.detach().float().to(h.device)
            h = h / (s.unsqueeze(0) * s.unsqueeze(1))

        def rounding(w: torch.Tensor, bits_: int, g: int):
            return gptq_quantize_weight(w, h, bits_, g)

    return QuantLinear.from_linear(
        linear, bits, group_size, input_scale=input_scale, clip_search=clip_search, rounding=rounding
    )


def _lookup_scales(act_scales: Mapping[str, torch.Tensor], prefix: str, rel_name: str) -> torch.Tensor | None:
    full = f"{prefix}{rel_name}"
    if full in act_scales:
        return act_scales[full]
    if prefix:
        return None
    hits = [k for k in act_scales if k.endswith("." + rel_name)]
    if len(hits) > 1:
        raise QuantizationError(
            f"activation statistics for {rel_name!r} are ambiguous ({hits[:2]} ...); pass prefix= "
            "the module's name in the model the statistics were collected on"
        )
    return act_scales[hits[0]] if hits else None


@torch.no_grad()
def quantize_module(
    module: nn.Module,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    act_scales: Mapping[str, torch.Tensor] | None = None,
    *,
    prefix: str = "",
    awq_alpha: float | None = 0.5,
    clip_search: bool = False,
    skip: Callable[[str], bool] | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """In place: every nn.Linear inside `module` becomes a QuantLinear of `bits` bits.

    `act_scales` (from `collect_act_scales`) turns on AWQ scaling; its keys are looked up
    as `prefix + name inside module` (pass e.g. ``prefix="model.layers.5."`` when
    quantizing one block with statistics collected on the whole model). A layer without
    statistics is quantized without scaling. `awq_alpha=None` searches alpha per layer.
    Mixed precision is calling this per block with different `bits`. `hessians` (from
    `collect_input_hessians`, keyed like `act_scales`) switches rounding to GPTQ.
    """
    _check_bits(bits)
    for full, parent, child_name, linear in _linear_children(module, skip):
        s = None
        if act_scales is not None:
            stat = _lookup_scales(act_scales, prefix, full)
            if stat is not None:
                g = effective_group_size(linear.in_features, bits, group_size)
                s = awq_input_scale(linear.weight, stat, bits, g, awq_alpha)
        h = _lookup_scales(hessians, prefix, full) if hessians is not None else None
        setattr(
            parent,
            child_name,
            quantize_linear(linear, bits, group_size, input_scale=s, clip_search=clip_search, hessian=h),
        )
