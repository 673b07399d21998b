"""The training forward of stored low-bit layers (`QuantLinear`), made cheap per step.

A client's emulator keeps its middle blocks as packed 3/4-bit codes (`emulators.quantize`),
and every forward rebuilds each weight from them. Measured on the shipped configuration
(SmolLM2-135M, all 26 middle blocks at int3-AWQ, batch 4 x 256, bf16, one thread): the
forward is 2.0 CPU-s of which the matmuls are ~84% and the rebuild ~16%; a cached bf16
copy of every middle weight would cost 184 MB, more than the client's whole training
margin, and torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) was 5x slower than a
bf16 matmul here. So the weights stay packed, and this module makes the rebuild cheap:

- 3-bit codes are read as one 24-bit word per 8 codes (three int32 ops instead of a
  reduction), converted straight into the compute dtype, and dequantized in place;
- scales, zero points and the AWQ reciprocal input scale are converted to the compute
  dtype once per run, not once per call.

The rebuilt weight is bit-identical to `QuantLinear.dequantized_weight()` at the same
compute dtype (tests/test_engine_quant_forward.py); the output differs only by multiplying with
the reciprocal AWQ input scale instead of dividing by it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

_SHIFTS3 = torch.arange(8, dtype=torch.int32) * 3


def is_quant_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "QuantLinear"


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


def _forward(layer: nn.Module, prepared: _Prepared, x: torch.Tensor) -> torch.Tensor:
    if prepared.inv_input_scale is not None:
        x = x * prepared.inv_input_scale.to(x.dtype)
    w = dequantize(layer, prepared)
    bias = prepared.bias
    if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts both itself
        w = w.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, bias)


def install_fast_forward(model: nn.Module, dtype: torch.dtype) -> Callable[[], None]:
    """Give every QuantLinear of `model` the fast forward in `dtype`; returns the undo."""
    patched: list[nn.Module] = []
    for module in model.modules():
        if not is_quant_linear(module):
            continue
        prepared = _Prepared(module, dtype)
        module.forward = lambda x, _m=module, _p=prepared: _forward(_m, _p, x)
        patched.append(module)

    def undo() -> None:
        for module in patched:
            del module.forward  # the instance attribute goes: the class method is back
        patched.clear()

    return undo
