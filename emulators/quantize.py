"""True low-bit weight storage for emulator blocks.

The Offsite-Tuning paper only fake-quantized (fp32 weights rounded onto a grid); here the
bundle really stores the low-bit codes, so it shrinks and the client holds less:

- int8: one scale and zero point per output channel (a group is the whole input row).
- int4 / int3 / int2: asymmetric groups of `group_size` input channels (64 by default),
  one fp16 scale and zero point per group.
- codes are bit-packed into ``qweight`` (uint8): 8 values in `bits` bytes, so int3 takes
  3 bytes per 8 weights and int2 one byte per 4.
- `QuantLinear` dequantizes on the fly in every forward and keeps nothing at full
  precision between calls: the client engine's memory is what this is for.
- AWQ-style activation-aware scaling (optional): input channels that see large
  activations are scaled up by ``s = mean|x| ** alpha`` before rounding (so they get a
  finer grid), and inputs are divided by ``s`` at run time, which leaves the product
  unchanged up to rounding. ``alpha`` is fixed or searched per layer.

Everything is stored as named buffers, so a quantized module round-trips through
safetensors: `make_quant_shells` builds empty modules of the right shapes for
``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_BITS = (8, 4, 3, 2)
DEFAULT_GROUP_SIZE = 64
AWQ_ALPHA_GRID = tuple(i / 10 for i in range(11))  # 0.0 (no scaling) ... 1.0


class QuantizationError(ValueError):
    """A bit width, group size or packed tensor that this module cannot handle."""


# --- packing -----------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported bit width {bits}; choose one of {', '.join(map(str, SUPPORTED_BITS))}")


def packed_numel(n_values: int, bits: int) -> int:
    """Bytes that `n_values` codes of `bits` bits take: 8 codes in `bits` bytes (padded to 8 codes)."""
    return math.ceil(n_values / 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor, 8 codes per `bits` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise QuantizationError(f"codes out of range for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (groups << shifts).sum(dim=1)  # at most 8*3=24 or 32 bits: fits int64
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `n_values` codes as uint8."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise QuantizationError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.numel() != packed_numel(n_values, bits) and bits != 8:
        raise QuantizationError(f"{packed.numel()} packed bytes do not hold {n_values} codes of {bits} bits")
    if bits == 8:
        return packed.reshape(-1)[:n_values]
    if 8 % bits == 0:
        # 4 and 2 bits: each byte holds whole codes; byte k of a group holds codes
        # [k*8/bits, (k+1)*8/bits), least significant first.
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        codes = (packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n_values]
    # 3 bits: 3 bytes form a 24-bit word holding 8 codes.
    groups = packed.reshape(-1, bits).to(torch.int32)
    byte_shifts = torch.arange(bits, dtype=torch.int32) * 8
    word = (groups << byte_shifts).sum(dim=1, dtype=torch.int32)
    shifts = torch.arange(8, dtype=torch.int32) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:n_values]


# --- the quantized linear layer ----------------------------------------------------


def effective_group_size(in_features: int, bits: int, group_size: int) -> int:
    """int8 uses one group per output channel; other widths use `group_size` when it
    divides the input width, else one group per row (small test models)."""
    if bits == 8 or group_size <= 0 or in_features % group_size:
        return in_features
    return group_size


class QuantLinear(nn.Module):
    """A linear layer whose weight lives as packed low-bit codes plus fp16 scales/zeros.

    Buffers: ``qweight`` (uint8, packed), ``scales`` and ``zeros`` (fp16, one per output
    channel and group), ``input_scale`` (fp32 per input channel, AWQ only), and ``bias``
    (kept at the layer's dtype: tiny). The fp32 weight is rebuilt in each forward and
    dropped afterwards.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        bias: bool = False,
        awq: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = effective_group_size(in_features, bits, group_size)
        self.compute_dtype = dtype
        n_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(packed_numel(in_features * out_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if awq:
            self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the forward uses it (in the scaled input space when AWQ is on)."""
        codes = unpack_codes(self.qweight, self.bits, self.in_features * self.out_features)
        codes = codes.view(self.out_features, self.n_groups, self.group_size).to(self.compute_dtype)
        scales = self.scales.to(self.compute_dtype).unsqueeze(-1)
        zeros = self.zeros.to(self.compute_dtype).unsqueeze(-1)
        return ((codes - zeros) * scales).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        awq = ", awq" if self.input_scale is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}{awq}"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        input_scale: torch.Tensor | None = None,
        clip_search: bool = False,
        hessian: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize `linear` (round to nearest, asymmetric) into a new QuantLinear.

        `input_scale` (AWQ): the weight's columns are multiplied by it before rounding and
        the forward divides the input by it. `clip_search` shrinks each group's range to
        the ratio (1.0 .. 0.7) with the least squared weight error. `hessian` (E[x x^T] of
        the layer's input, from `collect_input_hessians`) switches rounding to GPTQ's
        error compensation; the stored format is the same.
        """
        w = linear.weight.detach().float()
        out = cls(
            linear.in_features, linear.out_features, bits, group_size,
            bias=linear.bias is not None, awq=input_scale is not None, dtype=linear.weight.dtype,
        )
        if input_scale is not None:
            s = input_scale.detach().float().to(w.device)
            out.input_scale.copy_(s)
            w = w * s.unsqueeze(0)
        if hessian is not None:
            h = hessian.detach().float().to(w.device)
            if input_scale is not None:
                # the rounded weight sees x / s, whose second moment is H / (s s^T)
                h = h / (s.unsqueeze(0) * s.unsqueeze(1))
            codes, scales, zeros = gptq_quantize_weight(w, h, bits, out.group_size)
        else:
            codes, scales, zeros = quantize_weight(w, bits, out.group_size, clip_search=clip_search)
        out.qweight = pack_codes(codes, bits)
        out.scales.copy_(scales)
        out.zeros.copy_(zeros)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out.to(linear.weight.device)


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per (row, group): (codes uint8 [out, in], scales fp16, zeros fp16).

    Codes are computed against the fp16-rounded scale and zero, so dequantizing the stored
    values reproduces exactly the grid used here.
    """
    _check_bits(bits)
    out_f, in_f = w.shape
    if in_f % group_size:
        raise QuantizationError(f"group size {group_size} does not divide the input width {in_f}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    qmax = (1 << bits) - 1
    ratios = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7) if clip_search else (1.0,)
    best_err = best = None
    for r in ratios:
        codes, scales, zeros = _rtn(g, qmax, r)
        if len(ratios) == 1:
            best = (codes, scales, zeros)
            break
        err = ((codes.float() - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1) - g).pow(2).sum(-1)
        if best is None:
            best_err, best = err, (codes, scales, zeros)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = tuple(torch.where(better.unsqueeze(-1) if t.dim() == 3 else better, t, b) for t, b in zip((codes, scales, zeros), best))
    codes, scales, zeros = best
    return codes.reshape(out_f, in_f), scales, zeros


def _rtn(g: torch.Tensor, qmax: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo = (g.amin(dim=-1) * ratio).clamp(max=0.0)
    hi = (g.amax(dim=-1) * ratio).clamp(min=0.0)
    # 1e-6 keeps all-zero groups finite and stays representable in fp16. The factor rounds
    # the fp16 scale up, never down: a smaller stored scale would clip the group's extremes.
    scales = ((hi - lo) / qmax * (1 + 2**-10)).clamp(min=1e-6).to(torch.float16)
    zeros = torch.round(-lo / scales.float()).clamp(0, qmax).to(torch.float16)
    codes = torch.round(g / scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).clamp(0, qmax)
    return codes.to(torch.uint8), scales, zeros


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
        raise QuantizationError(f"hessian of shape {tuple(hessian.shape)} does not fit a weight with {in_f} input channels")
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
                _c, s16, z16 = _rtn(W1[:, i:i + group_size].unsqueeze(1), qmax, 1.0)
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


# --- whole modules -------------------------------------------------------------------


def _linear_children(module: nn.Module, skip: Callable[[str], bool] | None) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    found = []
    for name, mod in module.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not (skip and skip(full)):
                found.append((full, mod, child_name, child))
    return found


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
        setattr(parent, child_name, QuantLinear.from_linear(linear, bits, group_size, input_scale=s, clip_search=clip_search, hessian=h))


def make_quant_shells(
    module: nn.Module,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    awq: bool = False,
    skip: Callable[[str], bool] | None = None,
) -> None:
    """In place: replace every nn.Linear with an empty QuantLinear of the same shape, so
    that ``load_state_dict`` (from safetensors) can fill the packed buffers."""
    _check_bits(bits)
    for _full, parent, child_name, linear in _linear_children(module, skip):
        shell = QuantLinear(
            linear.in_features, linear.out_features, bits, group_size,
            bias=linear.bias is not None, awq=awq, dtype=linear.weight.dtype,
        )
        setattr(parent, child_name, shell.to(linear.weight.device))


@torch.no_grad()
def dequantize_module(module: nn.Module) -> None:
    """In place: every QuantLinear becomes a plain nn.Linear holding the same function
    (AWQ input scale folded into the weight). For evaluation harnesses that want speed
    over memory; never used on the client path."""
    for name, mod in list(module.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                w = child.dequantized_weight()
                if child.input_scale is not None:
                    w = w / child.input_scale.to(w.dtype).unsqueeze(0)
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=child.compute_dtype)
                lin.weight.copy_(w)
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(mod, child_name, lin.to(w.device))


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer in `module`, as stored (packed codes count as packed)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def quant_spec(module: nn.Module) -> dict[str, dict]:
    """{linear name: {"bits", "group_size", "awq"}} for the manifest."""
    return {
        name: {"bits": m.bits, "group_size": m.group_size, "awq": m.input_scale is not None}
        for name, m in module.named_modules()
        if isinstance(m, QuantLinear)
    }


# --- whole matrices (e.g. the tied embedding / LM head) ------------------------------


def pack_matrix(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Store a [rows, cols] matrix (e.g. a token embedding, groups along the hidden size) as
    {"qweight", "scales", "zeros"}, the same layout as a QuantLinear of that shape."""
    g = effective_group_size(weight.shape[1], bits, group_size)
    codes, scales, zeros = quantize_weight(weight.detach().float(), bits, g)
    return {"qweight": pack_codes(codes, bits), "scales": scales, "zeros": zeros}


def unpack_matrix(packed: Mapping[str, torch.Tensor], bits: int, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_matrix` (the group size follows from the scales' shape)."""
    rows, cols = shape
    n_groups = packed["scales"].shape[1]
    if packed["scales"].shape[0] != rows or cols % n_groups:
        raise QuantizationError(f"packed scales of shape {tuple(packed['scales'].shape)} do not fit a {rows}x{cols} matrix")
    g = cols // n_groups
    codes = unpack_codes(packed["qweight"], bits, rows * cols).view(rows, n_groups, g).to(dtype)
    return ((codes - packed["zeros"].to(dtype).unsqueeze(-1)) * packed["scales"].to(dtype).unsqueeze(-1)).view(rows, cols)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """The matrix exactly as `pack_matrix` + `unpack_matrix` would give it back."""
    return unpack_matrix(pack_matrix(weight, bits, group_size), bits, tuple(weight.shape), weight.dtype)
