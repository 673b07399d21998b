"""Low-bit quantization of emulator blocks: one import for both halves.

- `lowbit`: the stored format (packing, round to nearest, `QuantLinear`, shells, packed
  matrices) — what a client loads.
- `calibrate`: AWQ scales and GPTQ rounding from activation statistics — what only the
  model owner runs while building a bundle.

Code on the client path imports `lowbit` directly, so it never loads the calibration.
"""

from __future__ import annotations

from .calibrate import (
    AWQ_ALPHA_GRID,
    awq_input_scale,
    collect_act_scales,
    collect_input_hessians,
    gptq_quantize_weight,
    quantize_linear,
    quantize_module,
)
from .lowbit import (
    DEFAULT_GROUP_SIZE,
    SUPPORTED_BITS,
    QuantizationError,
    QuantLinear,
    Rounding,
    dequantize_module,
    effective_group_size,
    fake_quantize,
    make_quant_shells,
    pack_codes,
    pack_matrix,
    packed_numel,
    quant_spec,
    quantize_weight,
    quantized_bytes,
    unpack_codes,
    unpack_matrix,
)

__all__ = [
    "AWQ_ALPHA_GRID",
    "DEFAULT_GROUP_SIZE",
    "SUPPORTED_BITS",
    "QuantizationError",
    "QuantLinear",
    "Rounding",
    "awq_input_scale",
    "collect_act_scales",
    "collect_input_hessians",
    "dequantize_module",
    "effective_group_size",
    "fake_quantize",
    "gptq_quantize_weight",
    "make_quant_shells",
    "pack_codes",
    "pack_matrix",
    "packed_numel",
    "quant_spec",
    "quantize_linear",
    "quantize_module",
    "quantize_weight",
    "quantized_bytes",
    "unpack_codes",
    "unpack_matrix",
]
