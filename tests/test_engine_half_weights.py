"""Frozen fp16 adapter weights under bf16 autocast: cast through fp32 into a reused buffer,
with exactly the values and gradients autocast's own cast gives."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from offsite.client.engine.pruning import half_to, restore_adapter_fp32, store_frozen_adapter_fp16
from offsite.emulators.models import load_model


def test_half_to_equals_torch_cast():
    w = torch.randn(1001, 77).half()  # rows that do not divide into pieces evenly
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(half_to(w, dtype), w.to(dtype))


def _fp16_adapter_model():
    lm = load_model("tiny-llama")
    lm.model.requires_grad_(False)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.copy_(p.half().float())  # fp16-exact, as a bundle ships the adapter
    return lm


def test_frozen_fp16_linears_match_autocast_and_keep_their_gradient():
    lm = _fp16_adapter_model()
    blocks = [0, 1]
    attn0 = lm.model.model.layers[0].self_attn
    attn1 = lm.model.model.layers[1].self_attn
    store_frozen_adapter_fp16(lm.model, lm.family, blocks)
    assert attn0.q_proj.weight.dtype == torch.float16 and "forward" in vars(attn0.q_proj)
    x = torch.randn(3, 5, attn0.q_proj.in_features, dtype=torch.bfloat16)

    def reference(layer, inp):
        return F.linear(inp, layer.weight, layer.bias)  # autocast casts the fp16 weight itself

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():  # the scratch-buffer path
            assert torch.equal(attn0.q_proj(x), reference(attn0.q_proj, x))
            assert torch.equal(attn1.v_proj(x), reference(attn1.v_proj, x))
        # an input that needs a gradient: the weight autograd keeps must survive other layers' casts
        xg = x.clone().requires_grad_(True)
        y = attn0.k_proj(xg)
        attn1.k_proj(x)  # would overwrite a shared buffer
        y.float().square().sum().backward()
        xr = x.clone().requires_grad_(True)
        reference(attn0.k_proj, xr).float().square().sum().backward()
    assert torch.equal(xg.grad, xr.grad)

    restore_adapter_fp32(lm.model, lm.family, blocks)
    assert attn0.q_proj.weight.dtype == torch.float32 and "forward" not in vars(attn0.q_proj)
    assert isinstance(attn0.q_proj, nn.Linear)
