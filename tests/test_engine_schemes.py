"""Update schemes train exactly what they say; channel slices equal masked updates."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from offsite.client.engine import EngineTarget, SchemeError, TrainConfig, parse_scheme, train_model
from offsite.client.engine.layers import ChannelDelta
from offsite.emulators.data import Example
from offsite.emulators.models import load_model

ADAPTER = [0, 1, 6, 7]
TEXT = [Example("", ("def f(x):\n    return x * %d  # multiply\n" % i) * 6, f"t:{i}") for i in range(24)]


def _train(name: str, scheme: str, **kw):
    lm = load_model(name)
    before = {k: v.clone() for k, v in lm.model.named_parameters()}
    target = EngineTarget(lm.model, lm.tokenizer, lm.family, ADAPTER)
    cfg = TrainConfig(scheme=scheme, steps=2, lr=1e-2, block_size=32, batch_size=2, precision="fp32", **kw)
    result = train_model(target, TEXT, cfg, progress=False)
    changed = {k for k, v in result.adapter_state.items() if k in before and not torch.equal(before[k], v)}
    return lm, before, result, changed


def _block(name: str) -> int | None:
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), None)


def test_full_trains_every_adapter_weight_and_nothing_else():
    lm, before, result, changed = _train("tiny-llama", "full")
    adapter_names = {k for k in before if _block(k) in ADAPTER}
    assert set(result.adapter_state) == adapter_names  # the FULL adapter, keyed by original names
    assert changed == adapter_names
    after = dict(lm.model.named_parameters())
    for k in before:
        if _block(k) not in ADAPTER:  # middle blocks, embeddings (tied head), final norm
            assert torch.equal(before[k], after[k].float()), k


def test_top_trains_only_top_blocks():
    _, before, result, changed = _train("tiny-llama", "top")
    assert changed and {_block(k) for k in changed} == {6, 7}
    assert all(torch.equal(before[k], result.adapter_state[k]) for k in result.adapter_state if _block(k) in (0, 1))


def test_norms_trains_only_norm_gains_on_llama():
    _, before, result, changed = _train("tiny-llama", "norms")
    assert changed and all("norm" in k for k in changed)
    assert result.metrics["added_biases"] == [] and set(result.adapter_state) <= set(before)


def test_bias_adds_zero_initialised_biases_where_the_family_has_none():
    _, _, result, changed = _train("tiny-llama", "norms,bias")
    assert changed and all("norm" in k for k in changed)
    added = set(result.metrics["added_biases"])
    assert added and all(f"{m}.bias" in result.adapter_state for m in added)
    assert any(result.adapter_state[f"{m}.bias"].abs().sum() > 0 for m in added)


def test_norms_on_gpt2_uses_existing_biases():
    _, _, result, changed = _train("tiny-gpt2", "norms")
    assert result.metrics["added_biases"] == []
    assert changed and all(k.endswith(".bias") or ".ln_" in k for k in changed)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_channels_changes_only_selected_columns_of_input_projections(name):
    _, before, result, changed = _train(name, "channels:0.25")
    assert changed
    for k in changed:
        assert any(p in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc")), k
        diff = (result.adapter_state[k] - before[k]).abs()
        in_dim = 0 if "c_attn" in k or "c_fc" in k else 1  # Conv1D stores (in, out)
        touched = (diff.sum(dim=1 - in_dim) > 0).sum().item()
        assert touched <= round(0.25 * diff.shape[in_dim])


def test_lora_merges_into_linear_weights_only():
    _, _, result, changed = _train("tiny-llama", "lora:4")
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert not any("lora" in k for k in result.adapter_state)


def test_combined_scheme_per_block():
    _, _, result, changed = _train("tiny-llama", "top:full,bottom:norms")
    assert {_block(k) for k in changed} == {0, 1, 6, 7}
    assert all("norm" in k for k in changed if _block(k) in (0, 1))
    assert result.metrics["scheme_resolved"] == "0:norms,1:norms,6:full,7:full"


def test_parse_errors_explain_syntax():
    for bad in ("bogus", "channels:2", "lora:x", "top:channels:0.5,top:lora:4", "9:full", ""):
        with pytest.raises(SchemeError):
            parse_scheme(bad, ADAPTER)
    assert parse_scheme("top1:channels:0.5,bottom2:norms", ADAPTER).spec() == "0:norms,1:norms,7:channels:0.5"


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_channel_slice_equals_masked_update(conv1d, opt):
    torch.manual_seed(0)
    base = Conv1D(12, 16) if conv1d else torch.nn.Linear(16, 12)
    masked = Conv1D(12, 16) if conv1d else torch.nn.Linear(16, 12)
    masked.load_state_dict(base.state_dict())
    base.requires_grad_(False)
    sliced = ChannelDelta.top_channels(base, 0.25)
    assert sliced.delta.shape == (12, 4)  # gradient and optimizer state exist only for the slice
    mask = torch.zeros_like(masked.weight)
    if conv1d:
        mask[sliced.idx, :] = 1
    else:
        mask[:, sliced.idx] = 1
    masked.bias.requires_grad_(False)
    make = (
        (lambda p: torch.optim.SGD(p, lr=0.1))
        if opt == "sgd"
        else (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0))
    )
    o1, o2 = make([sliced.delta]), make([masked.weight])
    for step in range(4):
        x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(step))
        (sliced(x) ** 2).mean().backward()
        (masked(x) ** 2).mean().backward()
        masked.weight.grad *= mask
        o1.step(), o2.step()
        o1.zero_grad(), o2.zero_grad()
    folded = sliced.fold()
    torch.testing.assert_close(folded.weight, masked.weight.detach(), rtol=1e-5, atol=1e-6)
