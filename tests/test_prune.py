"""Gradient-scored MLP channel pruning: pruned channels are zero, stay zero under full
fine-tuning (a fixed point of gradient descent), and the score prefers harmless channels."""

from __future__ import annotations

import copy

import pytest
import torch

from offsite.emulators.data import TokenBlocks
from offsite.emulators.losses import causal_lm_nll, hidden_states
from offsite.emulators.models import load_model
from offsite.emulators.prune import PruneError, channel_scores, prune_channels, prune_emulator
from offsite.emulators.quantize import dequantize_module, quantize_module
from offsite.emulators.split import build_emulator_model, plan_split


def _blocks(n=8, size=32, seed=0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (n, size), generator=g)
    return TokenBlocks(ids, ids.clone(), torch.ones_like(ids))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_pruned_channels_are_zero_and_a_fixed_point_of_full_finetuning(tiny):
    plan = plan_split(8, (2, 2))
    emu = build_emulator_model(tiny, plan)
    data = _blocks()
    pruned = prune_emulator(emu, tiny.family, plan, data, fraction=0.5, n_batches=2)
    assert sorted(pruned) == plan.emulator_positions
    blocks = tiny.family.get_blocks(emu)
    for pos, idx in pruned.items():
        assert len(idx) == 64  # half of 128 intermediate channels
        mlp = blocks[pos].mlp
        assert mlp.gate_proj.weight[idx].abs().sum() == 0 and mlp.up_proj.weight[idx].abs().sum() == 0
        assert mlp.down_proj.weight[:, idx].abs().sum() == 0
    # low-bit storage keeps the zeros exactly (zero lies on the asymmetric grid)
    for pos in plan.emulator_positions:
        quantize_module(blocks[pos], 3, 32)
    dequantize_module(emu)
    # the strongest data owner: every parameter trained with AdamW for a few steps
    params = list(emu.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for ids, labels, mask in data.batches(4, generator=torch.Generator().manual_seed(1)):
        nll, n = causal_lm_nll(emu, ids, labels, mask)
        opt.zero_grad()
        (nll / n).backward()
        opt.step()
    for pos, idx in pruned.items():
        mlp = blocks[pos].mlp
        assert mlp.gate_proj.weight[idx].abs().sum() == 0
        assert mlp.up_proj.weight[idx].abs().sum() == 0
        assert mlp.down_proj.weight[:, idx].abs().sum() == 0
    # while the kept channels did train
    kept = [i for i in range(128) if i not in set(pruned[2])]
    assert blocks[2].mlp.up_proj.weight[kept].abs().sum() > 0


def test_score_prefers_channels_whose_removal_costs_least(tiny):
    plan = plan_split(8, (2, 2))
    data = _blocks(seed=3)
    emu = build_emulator_model(tiny, plan)
    # give the tiny random model a few channels that matter: scale them up
    with torch.no_grad():
        for pos in plan.emulator_positions:
            tiny.family.get_blocks(emu)[pos].mlp.down_proj.weight[:, :8] *= 20
    base = copy.deepcopy(emu)
    scores = channel_scores(emu, tiny.family, plan.emulator_positions, data, n_batches=2)
    assert all(s[:8].mean() > s[8:].mean() for s in scores.values())
    low = copy.deepcopy(base)
    prune_channels(low, tiny.family, scores, 0.25)
    high = copy.deepcopy(base)
    prune_channels(high, tiny.family, {p: -s for p, s in scores.items()}, 0.25)  # the highest-scored instead
    ids = data.input_ids[:4]
    with torch.no_grad():
        ref = hidden_states(base, ids)
        shift_low = (hidden_states(low, ids) - ref).pow(2).mean()
        shift_high = (hidden_states(high, ids) - ref).pow(2).mean()
    assert shift_low < shift_high / 4


def test_bad_fraction_and_family_name_the_fix(tiny):
    plan = plan_split(8, (2, 2))
    emu = build_emulator_model(tiny, plan)
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        prune_channels(emu, tiny.family, {2: torch.ones(128)}, 1.0)
    gpt2 = load_model("tiny-gpt2")
    g_emu = build_emulator_model(gpt2, plan)
    with pytest.raises(PruneError, match="gated MLPs"):
        prune_emulator(g_emu, gpt2.family, plan, _blocks(), 0.25)


def test_build_prunes_and_elevates_and_the_signed_bundle_keeps_both(tiny, tmp_path):
    """`build_bundle` with --prune and --elevate: the loaded bundle still has the pruned
    channels at zero (through int4 AWQ storage) and the elevated middle norm gains."""
    from offsite.emulators.build import BuildConfig, BuildError, build_bundle
    from offsite.emulators.bundle import load_bundle
    from offsite.emulators.quantize import dequantize_module
    from offsite.emulators.signing import generate_signing_key

    keys = generate_signing_key(tmp_path / "keys")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    cfg = BuildConfig(
        model="tiny-llama",
        quantize="int4",
        awq=True,
        block_size=64,
        corpus=str(corpus),
        prune_fraction=0.25,
        elevate_margin=0.3,
        elevate_steps=3,
    )
    manifest = build_bundle(cfg, keys[0], tmp_path / "b", progress=False, loaded=tiny)
    info = manifest["build"]
    assert info["pruned_channels"] == {str(i): 32 for i in range(2, 6)}
    assert info["elevation"]["margin"] == 0.3
    bundle = load_bundle(tmp_path / "b", keys[1])
    dequantize_module(bundle.model)
    blocks = bundle.family.get_blocks(bundle.model)
    for pos in range(2, 6):
        zero_rows = (blocks[pos].mlp.up_proj.weight.abs().sum(1) == 0).sum()
        assert int(zero_rows) == 32
    norms = [blocks[p].input_layernorm.weight for p in range(2, 6)]
    assert any(not torch.equal(n, torch.ones_like(n)) for n in norms)  # tiny-llama's norms start at 1
    with pytest.raises(BuildError, match=r"\[0, 1\)"):
        BuildConfig(prune_fraction=1.0).validate()
