"""The Offsite-Tuning split: the paper's uniform rule, errors, and emulator models for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from offsite.emulators.families import family_for
from offsite.emulators.models import LoadedModel, byte_tokenizer, load_model, state_digest
from offsite.emulators.split import (
    SplitError,
    SplitPlan,
    build_emulator_model,
    plan_split,
    to_emulator_name,
    to_original_name,
    uniform_indices,
)

FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-opt"]


def test_uniform_rule_matches_the_paper():
    # OPT-1.3B 2-8-2: 24 blocks, 20 middle, keep 8 by round(i*(n-1)/(k-1)).
    plan = plan_split(24, (2, 2), 8)
    expected = [2 + round(i * 19 / 7) for i in range(8)]
    assert plan.middle_kept == expected
    assert plan.middle_kept[0] == 2 and plan.middle_kept[-1] == 21  # first and last middle block kept
    assert plan.layer_origin == [0, 1] + expected + [22, 23]
    assert plan.adapter_positions == [0, 1, 10, 11]
    assert plan.emulator_positions == list(range(2, 10))
    assert uniform_indices(26, 26) == list(range(26))


def test_default_keeps_every_middle_block_and_explicit_kept_list():
    assert plan_split(8).middle_kept == [2, 3, 4, 5]
    assert plan_split(8).selection == "all"
    plan = plan_split(8, (1, 3), kept=[4, 2])
    assert plan.bottom == [0] and plan.top == [5, 6, 7]
    assert plan.middle_kept == [2, 4] and plan.selection == "explicit"
    assert SplitPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(adapter_layers=(2, 2), emulator_layers=5), "only 8 blocks"),
        (dict(adapter_layers=(4, 4)), "no middle"),
        (dict(adapter_layers=(2, 2), kept=[1, 3]), "not middle blocks"),
        (dict(adapter_layers=(2, 2), kept=[3, 3]), "twice"),
        (dict(adapter_layers=(2, 2), kept=[3], emulator_layers=2), "disagrees"),
        (dict(adapter_layers=(0, 0)), "at least one block"),
        (dict(adapter_layers=(2, 2), emulator_layers=-1), "negative"),
    ],
)
def test_impossible_splits_name_the_problem(kwargs, needle):
    with pytest.raises(SplitError, match=needle):
        plan_split(8, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_middle_blocks_kept_gives_the_full_models_logits(name):
    loaded = load_model(name)
    plan = plan_split(loaded.family.num_layers(loaded.model.config), (2, 2))
    emulator = build_emulator_model(loaded, plan)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, emulator(ids).logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_dropped_emulator_copies_blocks_by_origin(name):
    loaded = load_model(name)
    family = loaded.family
    plan = plan_split(8, (2, 2), 2)  # middle 2..5, keep 2 and 5
    assert plan.middle_kept == [2, 5]
    emulator = build_emulator_model(loaded, plan)
    assert family.num_layers(emulator.config) == 6
    assert len(family.get_blocks(emulator)) == 6
    original = dict(loaded.model.named_parameters())
    for ename, p in emulator.named_parameters():
        assert torch.equal(p, original[to_original_name(ename, plan, family)]), ename
    # The emulator's weights are copies: training it never touches the base model.
    assert all(
        p.data_ptr() != original[to_original_name(n, plan, family)].data_ptr() for n, p in emulator.named_parameters()
    )
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(emulator(ids).logits).all()


def test_names_map_both_ways_and_dropped_blocks_are_refused():
    loaded = load_model("tiny-llama")
    family = loaded.family
    plan = plan_split(8, (2, 2), 2)  # origin [0, 1, 2, 5, 6, 7]
    assert to_original_name("model.layers.3.mlp.up_proj.weight", plan, family) == "model.layers.5.mlp.up_proj.weight"
    assert (
        to_emulator_name("model.layers.6.self_attn.q_proj.weight", plan, family)
        == "model.layers.4.self_attn.q_proj.weight"
    )
    assert to_original_name("model.embed_tokens.weight", plan, family) == "model.embed_tokens.weight"
    for name in [n for n, _ in loaded.model.named_parameters() if family.block_index(n) in plan.layer_origin]:
        assert to_original_name(to_emulator_name(name, plan, family), plan, family) == name
    with pytest.raises(KeyError, match="not in the emulator"):
        to_emulator_name("model.layers.3.mlp.up_proj.weight", plan, family)


def _tiny_qwen2_with_layer_types() -> LoadedModel:
    tok = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=4,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(
        model=model, tokenizer=tok, family=family_for(model), model_id="tiny-qwen2", digest=state_digest(model)
    )


def test_per_layer_config_lists_follow_the_kept_blocks():
    loaded = _tiny_qwen2_with_layer_types()
    types = loaded.model.config.layer_types
    assert types[:4] == ["full_attention"] * 4 and types[4:] == ["sliding_attention"] * 4
    plan = plan_split(8, (2, 2), kept=[3, 4])  # origin [0, 1, 3, 4, 6, 7]
    emulator = build_emulator_model(loaded, plan)
    assert emulator.config.layer_types == [types[i] for i in plan.layer_origin]
    assert emulator.config.num_hidden_layers == 6
    full = build_emulator_model(loaded, plan_split(8, (2, 2)))
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        # Sliding-window layers stay sliding: all kept -> identical logits.
        assert torch.equal(full(ids).logits, loaded.model(ids).logits)


def test_plan_for_another_depth_is_refused():
    loaded = load_model("tiny-llama")
    with pytest.raises(SplitError, match="plan is for 10 blocks"):
        build_emulator_model(loaded, plan_split(10, (2, 2)))
