"""The engine's fast low-bit forward computes what the stored format's own forward does."""

import pytest
import torch
import torch.nn as nn

from offsite.client.engine.quant_forward import _Prepared, dequantize, install_fast_forward, unpack_codes_as
from offsite.emulators.quantize import QuantLinear, pack_codes, unpack_codes


def _layer(bits: int, awq: bool, bias: bool = False, in_f: int = 128, out_f: int = 48) -> QuantLinear:
    torch.manual_seed(bits * 10 + awq)
    lin = nn.Linear(in_f, out_f, bias=bias)
    scale = torch.rand(in_f) + 0.5 if awq else None
    return QuantLinear.from_linear(lin, bits, 64, input_scale=scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_matches_stored_format(bits):
    codes = torch.randint(0, 1 << bits, (8 * 37,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    got = unpack_codes_as(packed, bits, codes.numel(), torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, unpack_codes(packed, bits, codes.numel()).to(torch.bfloat16))
    assert torch.equal(got.to(torch.uint8), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_is_bit_identical(bits, dtype):
    layer = _layer(bits, awq=True)
    layer.compute_dtype = dtype
    assert torch.equal(dequantize(layer, _Prepared(layer, dtype)), layer.dequantized_weight())


@pytest.mark.parametrize("awq", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_and_undo_restores(awq, bias):
    layer = _layer(3, awq, bias)
    model = nn.Sequential(layer)
    x = torch.randn(2, 5, 128)
    want = layer(x)
    undo = install_fast_forward(model, torch.float32)
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # reciprocal vs division only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        undo()
        layer.compute_dtype = torch.bfloat16
        want_bf16 = layer(x)
        undo = install_fast_forward(model, torch.bfloat16)
        got_bf16 = layer(x)
    assert got_bf16.dtype == want_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.float(), want_bf16.float(), rtol=2e-2, atol=2e-2)
    undo()
    assert "forward" not in layer.__dict__
    layer.compute_dtype = torch.float32
    torch.testing.assert_close(layer(x), want)


def test_gradient_flows_to_the_input():
    layer = _layer(4, awq=True)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    want = x.grad.clone()
    x.grad = None
    undo = install_fast_forward(layer, torch.float32)
    layer(x).sum().backward()
    undo()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)
