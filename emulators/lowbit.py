"""The stored low-bit weight format: what a bundle holds and what clients load.

The Offsite-Tuning paper only fake-quantized (fp32 weights rounded onto a grid); here the
bundle really stores the low-bit codes, so it shrinks and the client holds less:

- int8: one scale and zero point per output channel (a group is the whole input row).
- int4 / int3 / int2: asymmetric groups of `group_size` input channels (64 by default),
  one fp16 scale and zero point per group.
- codes are bit-packed into ``qweight`` (uint8): 8 values in `bits` bytes, so int3 takes
  3 bytes per 8 weights and int2 one byte per 4.
- `QuantLinear` dequantizes on the fly in every forward and keeps nothing at full
  precision between calls: the client engine's memory is what this is for. With AWQ its
  inputs are divided by a stored per-channel ``input_scale``.

Everything is stored as named buffers, so a quantized module round-trips through
safetensors: `make_quant_shells` builds empty modules of the right shapes for
``load_state_dict``. Round to nearest (`quantize_weight`) is the format's own rounding;
the calibration that only the model owner runs (AWQ scales, GPTQ) is `calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_BITS = (8, 4, 3, 2)
DEFAULT_GROUP_SIZE = 64

# (weight, bits, group_size) -> (codes uint8 [out, in], scales fp16 [out, groups], zeros fp16 [out, groups])
Rounding = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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


# --- rounding onto the stored grid -------------------------------------------------------


def effective_group_size(in_features: int, bits: int, group_size: int) -> int:
    """int8 uses one group per output channel; other widths use `group_size` when it
    divides the input width, else one group per row (small test models)."""
    if bits == 8 or group_size <= 0 or in_features % group_size:
        return in_features
    return group_size


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
        best = tuple(
            torch.where(better.unsqueeze(-1) if t.dim() == 3 else better, t, b)
            for t, b in zip((codes, scales, zeros), best)
        )
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


# --- the quantized linear layer ----------------------------------------------------


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
        rounding: Rounding | None = None,
    ) -> QuantLinear:
        """Quantize `linear` into a new QuantLinear (asymmetric round to nearest by default).

        `input_scale` (AWQ): the weight's columns are multiplied by it before rounding and
        the forward divides the input by it. `clip_search` shrinks each group's range to
        the ratio (1.0 .. 0.7) with the least squared weight error. `rounding(w, bits,
        group_size) -> (codes, scales, zeros)` replaces round to nearest (the model owner's
        calibration passes GPTQ's, see `calibrate.quantize_linear`); the stored format is the same.
        """
        w = linear.weight.detach().float()
        out = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            bias=linear.bias is not None,
            awq=input_scale is not None,
            dtype=linear.weight.dtype,
        )
        if input_scale is not None:
            s = input_scale.detach().float().to(w.device)
            out.input_scale.copy_(s)
            w = w * s.unsqueeze(0)
        if rounding is not None:
            codes, scales, zeros = rounding(w, bits, out.group_size)
        else:
            codes, scales, zeros = quantize_weight(w, bits, out.group_size, clip_search=clip_search)
        out.qweight = pack_codes(codes, bits)
        out.scales.copy_(scales)
        out.zeros.copy_(zeros)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out.to(linear.weight.device)


# --- whole modules -------------------------------------------------------------------


def _linear_children(
    module: nn.Module, skip: Callable[[str], bool] | None
) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    found = []
    for name, mod in module.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not (skip and skip(full)):
                found.append((full, mod, child_name, child))
    return found


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
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            bias=linear.bias is not None,
            awq=awq,
            dtype=linear.weight.dtype,
        )
        setattr(parent, child_name, shell.to(linear.weight.device))


@torch.no_grad()
def dequantize_module(module: nn.Module) -> None:
    """In place: every QuantLinear becomes a plain nn.Linear holding the same function
    (AWQ input scale folded into the weight). For evaluation harnesses that want speed
    over memory; never used on the client path."""
    for mod in list(module.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                w = child.dequantized_weight()
                if child.input_scale is not None:
                    w = w / child.input_scale.to(w.dtype).unsqueeze(0)
                lin = nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, dtype=child.compute_dtype
                )
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


def unpack_matrix(
    packed: Mapping[str, torch.Tensor], bits: int, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `pack_matrix` (the group size follows from the scales' shape)."""
    rows, cols = shape
    n_groups = packed["scales"].shape[1]
    if packed["scales"].shape[0] != rows or cols % n_groups:
        raise QuantizationError(
            f"packed scales of shape {tuple(packed['scales'].shape)} do not fit a {rows}x{cols} matrix"
        )
    g = cols // n_groups
    codes = unpack_codes(packed["qweight"], bits, rows * cols).view(rows, n_groups, g).to(dtype)
    return ((codes - packed["zeros"].to(dtype).unsqueeze(-1)) * packed["scales"].to(dtype).unsqueeze(-1)).view(
        rows, cols
    )


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """The matrix exactly as `pack_matrix` + `unpack_matrix` would give it back."""
    return unpack_matrix(pack_matrix(weight, bits, group_size), bits, tuple(weight.shape), weight.dtype)
