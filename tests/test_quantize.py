"""True low-bit storage: packing, quantized linear accuracy, bytes, AWQ, safetensors round trip."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from offsite.emulators.data import python_reference_split, tokenize_examples
from offsite.emulators.models import load_model
from offsite.emulators.quantize import (
    QuantizationError,
    QuantLinear,
    quantize_linear,
    awq_input_scale,
    collect_act_scales,
    collect_input_hessians,
    gptq_quantize_weight,
    dequantize_module,
    fake_quantize,
    pack_matrix,
    unpack_matrix,
    make_quant_shells,
    pack_codes,
    packed_numel,
    quant_spec,
    quantize_module,
    quantize_weight,
    quantized_bytes,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("n", [1, 7, 8, 64, 1001])
def test_packing_round_trips_exactly(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n if bits == 8 else packed_numel(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


def test_int3_packs_eight_codes_in_three_bytes():
    codes = torch.tensor([7, 0, 5, 1, 2, 3, 6, 4])
    packed = pack_codes(codes, 3)
    assert packed.numel() == 3
    word = int(packed[0]) | int(packed[1]) << 8 | int(packed[2]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == codes.tolist()


def test_bad_bits_and_codes_are_refused():
    with pytest.raises(QuantizationError, match="unsupported bit width 5"):
        pack_codes(torch.zeros(8, dtype=torch.long), 5)
    with pytest.raises(QuantizationError, match="out of range"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(QuantizationError, match="do not hold"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 4, 64)


def _linear(in_f=256, out_f=96, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def _rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_int8_linear_is_close_and_a_quarter_of_fp32():
    lin = _linear()
    x = torch.randn(32, 256)
    q = QuantLinear.from_linear(lin, 8)
    assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    assert q.scales.shape == (96, 1)  # one scale per output channel
    assert _rel_err(q(x), lin(x)) < 1e-4
    weight_bytes = q.qweight.numel() * q.qweight.element_size()
    assert weight_bytes == 256 * 96  # 1 byte per weight: 1/4 of fp32
    assert quantized_bytes(q) < 0.27 * quantized_bytes(lin)


@pytest.mark.parametrize("bits,factor", [(4, 8), (3, 32 / 3), (2, 16)])
def test_low_bit_codes_shrink_by_the_expected_factor(bits, factor):
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits, group_size=64)
    assert q.scales.shape == (96, 4)
    fp32_weight_bytes = 256 * 96 * 4
    assert q.qweight.numel() == pytest.approx(fp32_weight_bytes / factor)
    # Error grows as bits fall but the layer stays the same function roughly.
    x = torch.randn(32, 256)
    assert _rel_err(q(x), lin(x)) < {4: 0.02, 3: 0.08, 2: 0.4}[bits]


def test_error_falls_with_more_bits():
    lin = _linear()
    x = torch.randn(64, 256)
    errs = [_rel_err(QuantLinear.from_linear(lin, b)(x), lin(x)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_dequantized_weight_matches_the_stored_grid():
    w = torch.randn(8, 128)
    codes, scales, zeros = quantize_weight(w, 4, 64)
    lin = nn.Linear(128, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QuantLinear.from_linear(lin, 4)
    expect = ((codes.view(8, 2, 64).float() - zeros.float()[..., None]) * scales.float()[..., None]).view(8, 128)
    assert torch.equal(q.dequantized_weight(), expect)


def test_clip_search_never_increases_weight_error():
    w = torch.randn(16, 128) * torch.linspace(0.1, 3, 128)
    w[0, 0] = 40.0  # an outlier stretches the range of its group

    def err(clip):
        c, s, z = quantize_weight(w, 3, 64, clip_search=clip)
        return float(
            (((c.view(16, 2, 64).float() - z.float()[..., None]) * s.float()[..., None]).view(16, 128) - w).pow(2).sum()
        )

    assert err(True) <= err(False)


def _skewed(seed=0):
    """A layer whose inputs have a few channels 30x larger than the rest (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) * 0.05)
    ch_scale = torch.ones(256)
    ch_scale[torch.randperm(256, generator=g)[:8]] = 30.0
    x = torch.randn(512, 256, generator=g) * ch_scale
    return lin, x


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_does_not_hurt_reconstruction_on_skewed_activations(bits):
    lin, x = _skewed()
    ref = lin(x)
    plain = QuantLinear.from_linear(lin, bits)
    mean_abs = x.abs().mean(0)
    searched = QuantLinear.from_linear(
        lin, bits, input_scale=awq_input_scale(lin.weight, mean_abs, bits, 64, alpha=None)
    )
    fixed = QuantLinear.from_linear(lin, bits, input_scale=awq_input_scale(lin.weight, mean_abs, bits, 64, alpha=0.5))
    e_plain, e_search, e_fixed = (_rel_err(m(x), ref) for m in (plain, searched, fixed))
    assert e_search <= e_plain * 1.001
    assert e_fixed < e_plain  # salient channels get a finer grid


def _correlated_inputs(seed=0, n=1024, d=128):
    """Inputs with strongly correlated channels (low-rank plus noise), where error
    compensation has room to work."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, d, generator=g)
    return torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_gptq_lowers_output_error_and_keeps_the_stored_format(bits):
    g = torch.Generator().manual_seed(bits)
    x = _correlated_inputs(bits)
    lin = nn.Linear(128, 32, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 128, generator=g) * 0.1)
    ref = lin(x)
    h = x.T @ x / x.shape[0]
    rtn = QuantLinear.from_linear(lin, bits, 64)
    gptq = quantize_linear(lin, bits, 64, hessian=h)
    assert _rel_err(gptq(x), ref) < 0.8 * _rel_err(rtn(x), ref)
    # same buffers, same grid: the stored codes dequantize with the stored scales/zeros
    assert {n for n, _ in gptq.named_buffers()} == {n for n, _ in rtn.named_buffers()}
    codes, scales, zeros = gptq_quantize_weight(lin.weight, h, bits, 64)
    assert int(codes.max()) <= (1 << bits) - 1
    expect = ((codes.view(32, 2, 64).float() - zeros.float()[..., None]) * scales.float()[..., None]).view(32, 128)
    assert torch.equal(gptq.dequantized_weight(), expect)


def test_gptq_with_identity_hessian_is_plain_rounding():
    # with uncorrelated unit inputs there is no error to push anywhere: GPTQ == RTN
    w = torch.randn(16, 128)
    c1, s1, z1 = gptq_quantize_weight(w, torch.eye(128), 4, 64, damp=0.0)
    c2, s2, z2 = quantize_weight(w, 4, 64)
    assert torch.equal(c1, c2) and torch.equal(s1, s2) and torch.equal(z1, z2)


def test_gptq_with_awq_scale_and_module_hessians():
    lin, x = _skewed(1)
    ref = lin(x)
    s = awq_input_scale(lin.weight, x.abs().mean(0), 3, 64, alpha=0.5)
    h = x.T @ x / x.shape[0]
    awq = QuantLinear.from_linear(lin, 3, input_scale=s)
    both = quantize_linear(lin, 3, input_scale=s, hessian=h)
    assert _rel_err(both(x), ref) < _rel_err(awq(x), ref)
    with pytest.raises(QuantizationError, match="does not fit"):
        gptq_quantize_weight(lin.weight, torch.eye(64), 3, 64)


def test_collected_hessians_drive_quantize_module():
    loaded = load_model("tiny-llama")
    model = loaded.model
    split = python_reference_split(n_shards=1)
    blocks = tokenize_examples(split.shards[0][:40], loaded.tokenizer, 64)
    prefix = loaded.family.block_prefix(3)
    hs = collect_input_hessians(model, blocks, lambda n: n.startswith(prefix), max_blocks=8)
    assert hs and all(h.shape[0] == h.shape[1] for h in hs.values())
    assert all(torch.allclose(h, h.T, atol=1e-5) for h in hs.values())
    block = copy.deepcopy(loaded.family.get_blocks(model)[3])
    quantize_module(block, 3, hessians=hs, prefix=prefix)
    assert all(isinstance(m, QuantLinear) for m in block.modules() if isinstance(m, (nn.Linear, QuantLinear)))


def test_quantize_module_with_act_scales_and_shells_round_trip(tmp_path):
    loaded = load_model("tiny-llama")
    model = loaded.model
    examples = python_reference_split(1).heldout[:5]
    blocks = tokenize_examples(examples, loaded.tokenizer, 64)
    ids = blocks.input_ids[:2]
    stats = collect_act_scales(model, blocks, lambda n: ".layers.3." in n, max_blocks=4)
    assert stats and all(".layers.3." in k for k in stats)
    assert all(v.shape == (64,) or v.shape == (128,) for v in stats.values())

    quantized = copy.deepcopy(model)
    block = quantized.model.layers[3]
    quantize_module(block, 3, 64, act_scales=stats, prefix="model.layers.3.")
    quantize_module(quantized.model.layers[4], 4, 64)
    spec = quant_spec(quantized)
    assert spec["model.layers.3.mlp.down_proj"] == {"bits": 3, "group_size": 64, "awq": True}
    assert spec["model.layers.4.self_attn.q_proj"]["bits"] == 4
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    with torch.no_grad():
        out_q = quantized(input_ids=ids).logits

    path = tmp_path / "emulator.safetensors"
    # Tied embedding/head share storage; a bundle stores the blocks, so save those.
    save_file({k: v.contiguous() for k, v in quantized.state_dict().items() if ".layers." in k}, str(path))
    fresh = copy.deepcopy(model)
    make_quant_shells(fresh.model.layers[3], 3, 64, awq=True)
    make_quant_shells(fresh.model.layers[4], 4, 64)
    missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and all(".layers." not in k for k in missing)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, out_q)

    # Dequantizing for an evaluation harness keeps the function.
    dequantize_module(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, out_q, atol=1e-4)


def test_quantized_middle_shrinks_bytes_and_stays_close_at_int8():
    loaded = load_model("tiny-llama")
    model = copy.deepcopy(loaded.model)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = sum(quantized_bytes(b) for b in model.model.layers)
    for block in model.model.layers:
        quantize_module(block, 8)
    after = sum(quantized_bytes(b) for b in model.model.layers)
    assert after < 0.3 * before  # linear weights to 1/4, norms stay fp32
    with torch.no_grad():
        assert _rel_err(model(input_ids=ids).logits, ref) < 1e-3


def test_ambiguous_statistics_name_the_fix():
    loaded = load_model("tiny-llama")
    blocks = tokenize_examples(python_reference_split(1).heldout[:3], loaded.tokenizer, 64)
    stats = collect_act_scales(loaded.model, blocks, lambda n: "layers" in n, max_blocks=2)
    block = copy.deepcopy(loaded.model.model.layers[2])
    with pytest.raises(QuantizationError, match="prefix="):
        quantize_module(block, 4, act_scales=stats)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_matrix_packing_round_trips_the_grid(bits):
    w = torch.randn(50, 128)
    packed = pack_matrix(w, bits, 64)
    back = unpack_matrix(packed, bits, (50, 128))
    assert torch.equal(back, fake_quantize(w, bits, 64))
    # Round to nearest: every weight within half a step of its group's grid.
    step = packed["scales"].float().repeat_interleave(128 // packed["scales"].shape[1], dim=1)
    assert bool(((back - w).abs() <= step * 0.5 + 1e-4).all())
    assert packed["qweight"].numel() == (50 * 128 if bits == 8 else packed_numel(50 * 128, bits))
