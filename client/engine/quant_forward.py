"""The training forward of stored low-bit layers (`QuantLinear`), made cheap per step.

A client's emulator keeps its middle blocks as packed 3/4-bit codes (`emulators.quantize`).
Two kernels run them (measured on the shipped configuration, SmolLM2-135M with all 26
middle blocks at int3-AWQ, batch 4 x 256, one thread, AMD EPYC with AVX-512 VNNI):

- "dequant": every forward rebuilds the weight from the codes in the compute dtype and
  runs a bf16 matmul (45 ms per block: 36 ms matmul, 9 ms rebuild). No memory beyond the
  packed codes. The rebuild is bit-identical to `QuantLinear.dequantized_weight()`: 3-bit
  codes are read as one 24-bit word per 8 codes, converted straight into the compute
  dtype and dequantized in place; scales/zeros/the AWQ reciprocal are converted once.
- "int8": the weight is rebuilt once, with the AWQ input scale folded in, and kept as int8
  per output row (symmetric, fp32 row scale); each forward quantizes its input per token
  (symmetric int8, scale = max|x| / 127) and runs `torch._int_mm` (int8 x int8 -> int32),
  then scales rows and columns back, 128 tokens at a time (21 ms per block). q/k/v and gate/up read the same
  input, which is quantized once. Costs 1 byte per weight (92 MB on the shipped emulator).
  The backward needs only the input gradient (the weight is frozen): grad_out times the
  cached weight rebuilt in the compute dtype, so autograd keeps no per-layer weight copy.
  The error against "dequant" is measured in tests/test_engine_quant_forward.py.

lowbit_kernels.py decides which layers get the int8 kernel; its rows replace the packed
codes (`adopt_int8`), so it costs the cache minus the codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory import trim_heap

_SHIFTS3 = torch.arange(8, dtype=torch.int32) * 3
KERNELS = ("auto", "int8", "dequant")
# Tokens per int8 matmul: the fp32/int32 temporaries of 128 rows stay under the engine's 1 MiB
# mmap threshold (memory.set_malloc_policy), so they are reused from the heap instead of being
# mapped and page-faulted afresh each call (whole-batch temporaries made the kernel slower than bf16).
ROWS = 128
ROW_BYTES = 768 * 1024  # the rebuild kernel's int32 unpack of one run of weight rows stays below 1 MiB


def is_quant_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "QuantLinear"


def quant_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_quant_linear(m)]


def int8_available() -> bool:
    """torch's int8 x int8 matmul runs here (it is a private op: check, do not assume)."""
    try:
        a = torch.ones(17, 8, dtype=torch.int8)
        return bool(torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))[0, 0] == 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def int8_cache_bytes(layer: nn.Module) -> int:
    """Memory of one layer's int8 weight: a byte per weight plus an fp32 scale per row."""
    return layer.out_features * (layer.in_features + 4)


def unpack_codes_as(packed: torch.Tensor, bits: int, n_values: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `n_values` codes of a `pack_codes` tensor, as `dtype` (exact: codes are small integers)."""
    if bits == 3 and n_values % 8 == 0:
        b = packed.view(-1, 3).to(torch.int32)
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return ((word[:, None] >> _SHIFTS3.to(word.device)) & 7).to(dtype).view(-1)
    from offsite.emulators.lowbit import unpack_codes

    return unpack_codes(packed, bits, n_values).to(dtype)


class _Prepared:
    """One layer's per-run constants in the compute dtype."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.zeros = layer.zeros.to(dtype).unsqueeze(-1)
        self.scales = layer.scales.to(dtype).unsqueeze(-1)
        self.inv_input_scale = None if layer.input_scale is None else (1.0 / layer.input_scale.float()).to(dtype)
        self.bias = None if layer.bias is None else layer.bias.to(dtype)


def dequantize(layer: nn.Module, prepared: _Prepared) -> torch.Tensor:
    """The layer's weight in the compute dtype, as `QuantLinear.dequantized_weight()` computes it."""
    codes = unpack_codes_as(layer.qweight, layer.bits, layer.in_features * layer.out_features, prepared.dtype)
    codes = codes.view(layer.out_features, layer.n_groups, layer.group_size)
    return codes.sub_(prepared.zeros).mul_(prepared.scales).view(layer.out_features, layer.in_features)


def _dequantize_rows(layer: nn.Module, prepared: _Prepared, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of `dequantize(layer, prepared)` (3-bit codes: whole 24-bit words per row run)."""
    k = layer.in_features
    packed = layer.qweight[r0 * k * 3 // 8 : r1 * k * 3 // 8]
    codes = unpack_codes_as(packed, 3, (r1 - r0) * k, prepared.dtype).view(r1 - r0, layer.n_groups, layer.group_size)
    return codes.sub_(prepared.zeros[r0:r1]).mul_(prepared.scales[r0:r1]).view(r1 - r0, k)


def _forward_by_rows(layer: nn.Module, prepared: _Prepared, x: torch.Tensor) -> torch.Tensor:
    """The no-grad forward a run of output rows at a time: the rebuilt rows and their int32 unpack
    stay under the 1 MiB mmap threshold (memory.set_malloc_policy), so they come from the heap
    instead of fresh, page-faulted mappings every call."""
    rows = max(8, (ROW_BYTES // (4 * layer.in_features)) // 8 * 8)
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = prepared.dtype if autocast else x.dtype
    x = x.to(dtype)
    out = torch.empty(*x.shape[:-1], layer.out_features, dtype=dtype, device=x.device)
    for r0 in range(0, layer.out_features, rows):
        r1 = min(r0 + rows, layer.out_features)
        w = _dequantize_rows(layer, prepared, r0, r1).to(dtype)
        bias = None if prepared.bias is None else prepared.bias[r0:r1].to(dtype)
        out[..., r0:r1] = F.linear(x, w, bias)
    return out


def _forward(layer: nn.Module, prepared: _Prepared, x: torch.Tensor) -> torch.Tensor:
    if prepared.inv_input_scale is not None:
        x = x * prepared.inv_input_scale.to(x.dtype)
    if layer.bits == 3 and layer.in_features % 8 == 0 and not (torch.is_grad_enabled() and x.requires_grad):
        return _forward_by_rows(layer, prepared, x)
    w = dequantize(layer, prepared)
    bias = prepared.bias
    if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts both itself
        w = w.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, bias)


# --- the int8 kernel --------------------------------------------------------------------


class Int8Weight:
    """A frozen weight as int8 rows, W ~= codes * scale[:, None], in the layer's own input space.

    The AWQ input scale is not folded into the weight: AWQ moved the input's outlier channels
    into the weight, and folding them back would put them into the per-token input quantization
    (a 10x larger error measured on the shipped emulator). The input is divided first."""

    def __init__(self, layer: nn.Module, inv_input_scale: torch.Tensor | None):
        w = dequantize(layer, _Prepared(layer, torch.float32))
        self.scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        self.codes_t = torch.round(w.div_(self.scale[:, None])).clamp_(-127, 127).to(torch.int8).t()  # (in, out)
        del w
        self.inv_input_scale = inv_input_scale  # fp32 [in] or None; shared between layers that read one input
        self.bias = None if layer.bias is None else layer.bias.float()

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this kernel multiplies by, in `dtype`, AWQ input scale included (for the input gradient)."""
        w = self.codes_t.t().to(torch.float32) * self.scale[:, None]
        if self.inv_input_scale is not None:
            w *= self.inv_input_scale
        return w.to(dtype)


class _InputQuant:
    """The last input quantized per token, reused while the same tensor comes back with the
    same AWQ scale (q, k and v read one input; so do gate and up)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.q: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, inv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [tokens, in], fp32 scale [tokens, 1]) of `x` [..., in] divided by the AWQ scale."""
        key = self.key
        if key is None or key[0] is not x or key[1] != x._version or key[2] is not inv:
            x2 = x.reshape(-1, x.shape[-1])
            q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
            scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
            for i in range(0, x2.shape[0], ROWS):
                # fp32 and AWQ-scaled in one pass (never the caller's fp32 tensor itself)
                xf = x2[i : i + ROWS].to(torch.float32, copy=True) if inv is None else torch.mul(x2[i : i + ROWS], inv)
                s = torch.amax(xf.abs(), dim=-1, keepdim=True).div_(127.0).clamp_(min=1e-12)
                q[i : i + ROWS] = xf.div_(s).round_()
                scale[i : i + ROWS] = s
            # holding `x` keeps its storage alive, so no other tensor can take its place
            self.key, self.q, self.scale = (x, x._version, inv), q, scale
        return self.q, self.scale

    def clear(self) -> None:
        self.key = self.q = self.scale = None


_INPUTS = _InputQuant()


def int8_linear_forward(w: Int8Weight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    q, a = _INPUTS(x, w.inv_input_scale)
    out = torch.empty(q.shape[0], w.scale.shape[0], dtype=out_dtype, device=x.device)
    for i in range(0, q.shape[0], ROWS):
        # separate same-dtype passes: mixed-dtype ops (int32 x fp32, an fp32 result stored
        # as bf16) take torch's unvectorised casting loops, measured slower than these four
        y = torch._int_mm(q[i : i + ROWS], w.codes_t).float().mul_(a[i : i + ROWS]).mul_(w.scale)
        if w.bias is not None:
            y += w.bias
        out[i : i + ROWS] = y
    return out.view(*x.shape[:-1], -1)


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: Int8Weight, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.w, ctx.x_dtype = w, x.dtype
        return int8_linear_forward(w, x, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype = grad.dtype if grad.dtype in (torch.bfloat16, torch.float16) else torch.float32
        gx = grad.to(dtype) @ ctx.w.weight(dtype)  # frozen weight: only the input gradient
        return gx.to(ctx.x_dtype), None, None


def _forward_int8(w: Int8Weight, dtype: torch.dtype | None, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = dtype or torch.get_autocast_dtype(x.device.type)
    else:
        out_dtype = x.dtype
    if x.requires_grad and torch.is_grad_enabled():
        return _Int8Linear.apply(x, w, out_dtype)
    return int8_linear_forward(w, x, out_dtype)


# --- the int8 weight in place of the packed codes ----------------------------------------


def int8_of(layer: nn.Module) -> Int8Weight | None:
    """The int8 weight that replaced this layer's packed codes (`adopt_int8`), if any."""
    return getattr(layer, "_offsite_int8", None)


def packed_bytes(layer: nn.Module) -> int:
    """What the layer's packed form holds: codes, scales and zeros (freed by `adopt_int8`)."""
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))


def int8_net_bytes(layer: nn.Module) -> int:
    """What adopting the int8 weight adds to the process: the cache minus the packed codes it frees."""
    return 0 if int8_of(layer) is not None else int8_cache_bytes(layer) - packed_bytes(layer)


def adopt_int8(layer: nn.Module, w: Int8Weight) -> None:
    """Keep `w` as the layer's weight and free the packed codes it was built from.

    The int8 rows are then the layer's only copy (they cannot give the codes back): its
    forward stays the int8 kernel after training (`install_fast_forward`'s undo leaves it),
    and `dequantized_weight()` returns the int8 rows' weight in the AWQ-scaled input space."""
    layer._offsite_int8 = w
    for name in ("qweight", "scales", "zeros"):
        old = getattr(layer, name)
        setattr(layer, name, torch.empty(0, dtype=old.dtype, device=old.device))

    def dequantized_weight(_w=w, _layer=layer) -> torch.Tensor:
        weight = _w.weight(torch.float32)
        if _layer.input_scale is not None:
            weight = weight * _layer.input_scale.float()
        return weight.to(_layer.compute_dtype)

    layer.dequantized_weight = dequantized_weight
    layer.forward = lambda x, _w=w: _forward_int8(_w, None, x)


def install_fast_forward(
    model: nn.Module, dtype: torch.dtype, int8_layers: int = 0, replace: bool = False
) -> Callable[[], None]:
    """Give every QuantLinear of `model` a fast forward in `dtype`; returns the undo.

    The first `int8_layers` of them (model order) get the int8 kernel, the rest "dequant";
    a layer whose codes an int8 weight already replaced keeps the int8 kernel whatever
    `int8_layers` says. With `replace`, the new int8 weights replace the packed codes
    (`adopt_int8`): the int8 kernel then costs its cache minus the codes, not the whole cache."""
    patched: list[nn.Module] = []
    shared: list[torch.Tensor] = []  # equal AWQ scales as one tensor, so their input is quantized once
    for i, module in enumerate(quant_linears(model)):
        w = int8_of(module)
        if w is None and i < int8_layers:
            inv = None if module.input_scale is None else 1.0 / module.input_scale.float()
            if inv is not None:
                inv = next((t for t in shared[-4:] if t.shape == inv.shape and torch.equal(t, inv)), inv)
                if not shared or inv is not shared[-1]:
                    shared.append(inv)
            w = Int8Weight(module, inv)
            if replace:
                adopt_int8(module, w)
                if i % 7 == 6:
                    # the freed codes are small holes the larger int8 rows do not fit: hand them
                    # back as we go, or the heap holds both forms at once (~50 MB more at the peak)
                    trim_heap()
        if w is not None:
            module.forward = lambda x, _w=w: _forward_int8(_w, dtype, x)
        else:
            prepared = _Prepared(module, dtype)
            module.forward = lambda x, _m=module, _p=prepared: _forward(_m, _p, x)
        patched.append(module)

    def undo() -> None:
        for module in patched:
            w = int8_of(module)
            if w is None:
                del module.forward  # the instance attribute goes: the class method is back
            else:  # the codes are gone: the int8 kernel stays, in the caller's dtypes
                module.forward = lambda x, _w=w: _forward_int8(_w, None, x)
        patched.clear()
        _INPUTS.clear()

    return undo


def drop_dead_mlp_channels(model: nn.Module) -> int:
    """Remove the MLP channels that are exactly zero from int8-adopted gate/up/down layers.

    A pruned emulator (`emulators.prune`) stores each removed intermediate channel as a zero
    row of gate_proj and up_proj (and a zero column of down_proj). With no bias such a
    channel's activation is silu(0) * 0 = 0 and adds nothing to down_proj's output, nor to
    its per-token input scale (a max over |x|): dropping it gives the same output, bit for bit,
    with ~10% fewer MLP weights to hold and multiply on the shipped emulator. Only layers whose
    codes an int8 weight replaced (`adopt_int8`) are touched: they stay this way. Returns the
    number of channels dropped."""
    dropped = 0
    for mlp in model.modules():
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        ws = [None if p is None else int8_of(p) for p in parts]
        if any(w is None for w in ws):
            continue
        gate, up, down = ws
        if gate.bias is not None or up.bias is not None or gate.scale.numel() != down.codes_t.shape[0]:
            continue
        zero_gate = ~gate.codes_t.t().ne(0).any(dim=1)
        zero_up = ~up.codes_t.t().ne(0).any(dim=1)
        keep = ~(zero_gate | zero_up)
        if bool(keep.all()) or not bool(keep.any()):
            continue
        for w, layer in ((gate, parts[0]), (up, parts[1])):
            w.codes_t = w.codes_t.t()[keep].contiguous().t()
            w.scale = w.scale[keep].contiguous()
            layer.out_features = int(keep.sum())
        down.codes_t = down.codes_t[keep].t().contiguous().t()
        if down.inv_input_scale is not None:
            down.inv_input_scale = down.inv_input_scale[keep].contiguous()
        if parts[2].input_scale is not None:
            parts[2].input_scale = parts[2].input_scale[keep].contiguous()
        parts[2].in_features = int(keep.sum())
        dropped += int((~keep).sum())
    return dropped
