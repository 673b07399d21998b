"""Loss elevation: the emulator's loss rises towards full + H for the proxy adapters, only
the middle norm gains change, and both models get their adapters back."""

from __future__ import annotations

import copy

import pytest
import torch

from offsite.emulators.data import TokenBlocks
from offsite.emulators.elevate import (
    ElevationConfig,
    ElevationError,
    adapter_state,
    elevate_emulator,
    elevate_into,
    load_adapter,
    middle_norm_params,
)
from offsite.emulators.importance import mean_nll
from offsite.emulators.models import load_model
from offsite.emulators.quantize import QuantLinear, quantize_module
from offsite.emulators.split import build_emulator_model, plan_split


def _blocks(n=8, size=32, seed=0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (n, size), generator=g)
    return TokenBlocks(ids, ids.clone(), torch.ones_like(ids))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_elevation_lifts_the_gap_to_the_margin_and_touches_only_middle_norms(tiny):
    plan = plan_split(8, (2, 2))
    emu = build_emulator_model(tiny, plan)
    full_before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    emu_before = {k: v.clone() for k, v in emu.state_dict().items()}
    data = _blocks()
    cfg = ElevationConfig(margin=0.3, steps=48, lr=0.2, finetune_checkpoints=(2,), batch_size=2)
    report = elevate_emulator(tiny.model, emu, tiny.family, plan, data, cfg)
    assert report["proxies"] == 4  # pretrained, two noised, one fine-tune checkpoint
    assert abs(report["gap_start"]) < 0.02  # the emulator starts as the full model
    assert abs(report["gap_end"] - 0.3) < abs(report["gap_start"] - 0.3) / 2
    # the gap holds for an adapter it never saw (another noised copy), in both models
    g = torch.Generator().manual_seed(7)
    base = adapter_state(tiny.model, tiny.family, plan.adapter_origin)
    unseen = {
        k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v for k, v in base.items()
    }
    full = copy.deepcopy(tiny.model)
    load_adapter(full, tiny.family, plan.adapter_origin, unseen)
    load_adapter(emu, tiny.family, plan.adapter_positions, unseen)
    gap = mean_nll(emu, data) - mean_nll(full, data)
    assert abs(gap - 0.3) < 0.15
    load_adapter(emu, tiny.family, plan.adapter_positions, base)
    changed = {k for k, v in emu.state_dict().items() if not torch.equal(v, emu_before[k])}
    assert changed and changed <= set(middle_norm_params(emu, tiny.family, plan))
    assert all(torch.equal(v, full_before[k]) for k, v in tiny.model.state_dict().items())


def test_elevate_into_a_quantized_emulator_keeps_the_low_bit_weights(tiny):
    plan = plan_split(8, (2, 2))
    emu = build_emulator_model(tiny, plan)
    for pos in plan.emulator_positions:
        quantize_module(tiny.family.get_blocks(emu)[pos], 4, 32)
    codes = {n: b.clone() for n, b in emu.named_buffers() if n.endswith("qweight")}
    norms = {n: p.clone() for n, p in middle_norm_params(emu, tiny.family, plan).items()}
    elevate_into(
        tiny.model,
        emu,
        tiny.family,
        plan,
        _blocks(),
        ElevationConfig(margin=0.3, steps=6, lr=5e-2, finetune_checkpoints=()),
    )
    assert any(isinstance(m, QuantLinear) for m in emu.modules())
    assert all(torch.equal(b, codes[n]) for n, b in emu.named_buffers() if n.endswith("qweight"))
    assert any(not torch.equal(p, norms[n]) for n, p in middle_norm_params(emu, tiny.family, plan).items())


def test_adapter_state_round_trips_between_full_and_emulator_positions(tiny):
    plan = plan_split(8, (2, 2), emulator_layers=2)
    emu = build_emulator_model(tiny, plan)
    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    state = adapter_state(other, tiny.family, plan.adapter_origin)
    load_adapter(emu, tiny.family, plan.adapter_positions, state)
    assert adapter_state(emu, tiny.family, plan.adapter_positions).keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in adapter_state(emu, tiny.family, plan.adapter_positions).items())


def test_bad_options_name_the_fix():
    with pytest.raises(ElevationError, match=">= 0"):
        ElevationConfig(margin=-0.1).validate()
    with pytest.raises(ElevationError, match="steps"):
        ElevationConfig(steps=0).validate()
