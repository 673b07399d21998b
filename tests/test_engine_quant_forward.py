"""The engine's fast low-bit forward computes what the stored format's own forward does."""

import pytest
import torch
import torch.nn as nn

from offsite.client.engine.quant_forward import (
    Int8Weight,
    _Prepared,
    dequantize,
    install_fast_forward,
    int8_available,
    unpack_codes_as,
)
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


# --- the int8 kernel: an approximation of the rebuild kernel, with its error bounded ----------

int8_only = pytest.mark.skipif(not int8_available(), reason="torch._int_mm does not run on this machine")


@int8_only
@pytest.mark.parametrize("awq", [False, True])
def test_int8_forward_is_close_to_the_rebuild(awq):
    layer = _layer(3, awq, bias=True, in_f=192, out_f=64)
    x = torch.randn(4, 9, 192)
    want = layer(x)
    undo = install_fast_forward(layer, torch.float32, int8_layers=1)
    got = layer(x)
    undo()
    assert got.shape == want.shape and got.dtype == want.dtype
    # per-token int8 input and int8 rows: about 1% of the output's norm, never the 3-bit grid's error
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-6 < rel < 0.02, rel
    assert "forward" not in layer.__dict__


@int8_only
def test_int8_weight_rows_reproduce_the_dequantized_weight():
    layer = _layer(3, awq=True, in_f=128, out_f=48)
    w = Int8Weight(layer, 1.0 / layer.input_scale)
    stored = layer.dequantized_weight()  # in the AWQ-scaled input space, as the layer keeps it
    got = w.weight(torch.float32)  # what the kernel multiplies the unscaled input by
    # each int8 row is within half an int8 step (of the row's range) of the stored weight
    step = stored.abs().amax(dim=1, keepdim=True) / 127
    err = (got - stored / layer.input_scale).abs()
    assert (err <= step / 2 / layer.input_scale + 1e-7).all()
    assert err.max() > 0  # a 3-bit group grid is not an int8 row grid: the test sees the rounding


@int8_only
def test_q_k_v_share_one_input_quantization():
    torch.manual_seed(0)
    lin = [nn.Linear(128, n) for n in (64, 32, 32)]
    scale = torch.rand(128) + 0.5
    layers = nn.ModuleList(QuantLinear.from_linear(m, 3, 64, input_scale=scale) for m in lin)
    undo = install_fast_forward(layers, torch.float32, int8_layers=3)
    x = torch.randn(2, 7, 128)
    from offsite.client.engine import quant_forward

    calls = []
    real = quant_forward._InputQuant.__call__

    def spy(self, t, inv):
        before = self.key
        out = real(self, t, inv)
        calls.append(before is not self.key)  # True: quantized afresh
        return out

    quant_forward._InputQuant.__call__ = spy
    try:
        [layer(x) for layer in layers]
        x.mul_(2)  # an in-place change is a new input
        layers[0](x)
    finally:
        quant_forward._InputQuant.__call__ = real
        undo()
    assert calls == [True, False, False, True]


@int8_only
def test_int8_adapter_gradients_match_the_rebuild_on_a_tiny_emulator():
    """Backward through the frozen int8 middle reaches the bottom adapter block with the
    gradient the rebuild kernel gives, within the kernel's forward error."""
    from offsite.emulators.build import BuildConfig, Corpus, prepare_emulator
    from offsite.emulators.data import Example, tokenize_examples
    from offsite.emulators.losses import causal_lm_nll
    from offsite.emulators.models import load_model

    loaded = load_model("tiny-llama")
    blocks = tokenize_examples([Example("", "def f(x):\n    return x * 2\n" * 40)], loaded.tokenizer, 64)
    cfg = BuildConfig(model="tiny-llama", quantize="int3", awq=True, block_size=64)
    emulator, plan, _, _ = prepare_emulator(cfg, loaded, corpus=Corpus(blocks, blocks, "test"), progress=False)
    model = emulator
    model.eval().requires_grad_(False)
    assert len([m for m in model.modules() if isinstance(m, QuantLinear)]) > 0
    bottom = [p for n, p in model.named_parameters() if ".layers.0." in n and p.is_floating_point()]
    for p in bottom:
        p.requires_grad_(True)
    ids, labels, mask = blocks.input_ids[:2], blocks.labels[:2], blocks.attention_mask[:2]

    def grads(int8_layers):
        undo = install_fast_forward(model, torch.float32, int8_layers)
        nll, n = causal_lm_nll(model, ids, labels, mask, 64)
        (nll / n).backward()
        undo()
        out = torch.cat([p.grad.flatten() for p in bottom])
        for p in bottom:
            p.grad = None
        return out, float(nll.detach() / n)

    want, loss_want = grads(0)
    got, loss_got = grads(10**6)
    assert want.norm() > 0
    assert abs(loss_got - loss_want) / loss_want < 0.01
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    rel = ((got - want).norm() / want.norm()).item()
    assert cos > 0.995 and rel < 0.1, (cos, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_by_runs_of_rows_matches_the_whole_weight(monkeypatch, dtype):
    from offsite.client.engine import quant_forward

    layer = _layer(3, awq=True, bias=True, in_f=128, out_f=48)
    layer.compute_dtype = dtype
    x = torch.randn(3, 5, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        want = layer(x)
        monkeypatch.setattr(quant_forward, "ROW_BYTES", 16 * 4 * 128)  # runs of 16 rows: 3 runs
        undo = install_fast_forward(layer, dtype)
        got = layer(x)
        undo()
    assert got.dtype == want.dtype
    torch.testing.assert_close(
        got.float(),
        want.float(),
        rtol=1e-5 if dtype == torch.float32 else 2e-2,
        atol=1e-5 if dtype == torch.float32 else 2e-2,
    )


@int8_only
def test_adopted_int8_replaces_the_codes_and_keeps_working_after_undo():
    from offsite.client.engine.quant_forward import int8_net_bytes, int8_of, packed_bytes

    layer = _layer(4, awq=True, bias=False, in_f=128, out_f=64)
    x = torch.randn(3, 128)
    net = int8_net_bytes(layer)
    assert net == 64 * (128 + 4) - packed_bytes(layer) > 0
    undo = install_fast_forward(layer, torch.float32, int8_layers=1, replace=True)
    want = layer(x)
    undo()
    assert int8_of(layer) is not None and layer.qweight.numel() == 0 and int8_net_bytes(layer) == 0
    torch.testing.assert_close(layer(x), want)  # the int8 kernel stays: the codes are gone
    # a later run keeps the int8 kernel even when asked for none
    undo = install_fast_forward(layer, torch.float32, int8_layers=0)
    torch.testing.assert_close(layer(x), want)
    undo()
    w = layer.dequantized_weight()
    torch.testing.assert_close(torch.nn.functional.linear(x / layer.input_scale, w), want, rtol=0.03, atol=0.03)


@int8_only
def test_dropping_pruned_mlp_channels_changes_no_output_bit():
    from offsite.client.engine.quant_forward import drop_dead_mlp_channels

    torch.manual_seed(0)
    hidden, inter = 64, 96
    gate, up, down = (
        nn.Linear(hidden, inter, bias=False),
        nn.Linear(hidden, inter, bias=False),
        nn.Linear(inter, hidden, bias=False),
    )
    dead = torch.tensor([3, 10, 11, 50, 95])
    with torch.no_grad():  # what emulators.prune stores: zero rows of gate and up, zero columns of down
        gate.weight[dead] = 0
        up.weight[dead] = 0
        down.weight[:, dead] = 0

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            s_in, s_mid = torch.rand(hidden) + 0.5, torch.rand(inter) + 0.5
            self.gate_proj = QuantLinear.from_linear(gate, 4, 32, input_scale=s_in)
            self.up_proj = QuantLinear.from_linear(up, 4, 32, input_scale=s_in)
            self.down_proj = QuantLinear.from_linear(down, 4, 32, input_scale=s_mid)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    mlp = MLP()
    x = torch.randn(2, 7, hidden)
    undo = install_fast_forward(mlp, torch.float32, int8_layers=3, replace=True)
    want = mlp(x)
    assert drop_dead_mlp_channels(mlp) == len(dead)
    got = mlp(x)
    undo()
    assert torch.equal(got, want)
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == inter - len(dead)
    assert drop_dead_mlp_channels(mlp) == 0


@pytest.mark.parametrize("kernel", ["dequant", "int8"])
def test_a_rebuilt_layer_makes_the_step_take_the_whole_micro_batch(kernel):
    """The rebuild kernel rebuilds each weight once per pass: a pass per sequence would rebuild
    it batch_size times a step, so the step keeps one pass while any layer rebuilds."""
    from offsite.client.engine import TrainConfig
    from offsite.client.engine.lowbit_kernels import install_lowbit_kernels

    if kernel == "int8" and not int8_available():
        pytest.skip("torch._int_mm does not run on this machine")
    model = nn.Sequential(_layer(4, awq=True), _layer(4, awq=False))
    cfg = TrainConfig(lowbit_kernel=kernel, sequences_per_pass=1)
    kernels = install_lowbit_kernels(model, cfg, torch.float32)
    try:
        assert kernels.int8_layers == (2 if kernel == "int8" else 0)
        assert kernels.sequences_per_pass(cfg) == (1 if kernel == "int8" else None)
    finally:
        kernels.undo()
