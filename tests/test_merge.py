"""Adapter merging: each method's arithmetic on hand-built deltas, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from offsite.emulators.adapter import load_adapter, save_adapter
from offsite.emulators.merge import MergeConfig, MergeError, merge_adapters, merge_states, task_vectors
from offsite.emulators.models import load_model
from offsite.emulators.plugin import plug_in

BASE = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([[0.5, -0.5]])}


def _adapter(dw, db=(0.0, 0.0)):
    return {"w": BASE["w"] + torch.tensor(dw), "b": BASE["b"] + torch.tensor([db])}


A = _adapter([3.0, -2.0, 0.1, 1.0], [0.2, 0.2])
B = _adapter([1.0, 4.0, -0.2, -5.0], [0.4, -0.2])


def _delta(merged, name="w"):
    return merged[name] - BASE[name]


def test_task_vectors_are_adapter_minus_base_and_inputs_stay_untouched():
    a_before = {k: v.clone() for k, v in A.items()}
    d = task_vectors(BASE, [A, B])
    assert torch.allclose(d[0]["w"], torch.tensor([3.0, -2.0, 0.1, 1.0]))
    merge_states(BASE, [A, B], MergeConfig("ties", density=0.5))
    assert all(torch.equal(A[k], a_before[k]) for k in A)


def test_average_is_the_weighted_mean_of_the_adapters():
    m = merge_states(BASE, [A, B], MergeConfig("average"))
    assert torch.allclose(m["w"], (A["w"] + B["w"]) / 2)
    m = merge_states(BASE, [A, B], MergeConfig("average", weights=(3.0, 1.0)))
    assert torch.allclose(m["w"], 0.75 * A["w"] + 0.25 * B["w"])
    assert torch.allclose(m["b"], 0.75 * A["b"] + 0.25 * B["b"])


def test_task_arithmetic_adds_scaled_weighted_deltas():
    m = merge_states(BASE, [A, B], MergeConfig("task-arithmetic", weights=(1.0, 0.5), scale=0.8))
    expected = 0.8 * (torch.tensor([3.0, -2.0, 0.1, 1.0]) + 0.5 * torch.tensor([1.0, 4.0, -0.2, -5.0]))
    assert torch.allclose(_delta(m), expected)


def test_ties_elects_the_sign_and_averages_only_agreeing_entries():
    # No trimming: entry 0 agrees (+3, +1) -> mean 2; entry 1 sums to +2 -> only B's +4 survives;
    # entries 2 and 3 elect "-" -> only B's -0.2 and -5 survive (A's +0.1 and +1 are dropped).
    m = merge_states(BASE, [A, B], MergeConfig("ties", density=1.0))
    assert torch.allclose(_delta(m), torch.tensor([2.0, 4.0, -0.2, -5.0]))
    # Averaging the same deltas lets opposite signs cancel: entry 3 would be -2, not -5.
    avg = merge_states(BASE, [A, B], MergeConfig("average"))
    assert torch.allclose(_delta(avg)[3], torch.tensor(-2.0))


def test_ties_trims_each_delta_to_its_top_k_by_magnitude_before_the_election():
    # density 0.5 of 4 entries: A keeps 3 and -2, B keeps 4 and -5.
    m = merge_states(BASE, [A, B], MergeConfig("ties", density=0.5, scale=0.5))
    assert torch.allclose(_delta(m), 0.5 * torch.tensor([3.0, 4.0, 0.0, -5.0]))


def test_ties_frequency_election_counts_signs_not_magnitudes():
    c = _adapter([-0.1, -0.1, -0.1, -0.1])
    d = _adapter([-0.1, -0.1, -0.1, -0.1])
    big = _adapter([9.0, 9.0, 9.0, 9.0])
    total = merge_states(BASE, [big, c, d], MergeConfig("ties", density=1.0))
    freq = merge_states(BASE, [big, c, d], MergeConfig("ties", density=1.0, majority_sign="frequency"))
    assert torch.allclose(_delta(total), torch.full((4,), 9.0))
    assert torch.allclose(_delta(freq), torch.full((4,), -0.1))


def test_dare_drops_with_p_and_rescales_by_one_over_one_minus_p():
    n = 200_000
    base = {"w": torch.zeros(n)}
    ones = {"w": torch.ones(n)}
    zeros = {"w": torch.zeros(n)}
    m = merge_states(base, [ones, zeros], MergeConfig("dare", drop_rate=0.7, seed=1))["w"]
    kept = m != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # each entry survives with 1 - p
    assert torch.allclose(m[kept], torch.full_like(m[kept], 1 / 0.3))  # survivors rescaled
    assert abs(m.mean().item() - 1.0) < 0.03  # the expectation of the delta is unchanged


def test_dare_is_reproducible_by_seed_and_leaves_the_global_generator_alone():
    base = {"w": torch.zeros(1000)}
    x, y = {"w": torch.randn(1000)}, {"w": torch.randn(1000)}
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    m1 = merge_states(base, [x, y], MergeConfig("dare", drop_rate=0.5, seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    m2 = merge_states(base, [x, y], MergeConfig("dare", drop_rate=0.5, seed=7))
    m3 = merge_states(base, [x, y], MergeConfig("dare", drop_rate=0.5, seed=8))
    assert torch.equal(m1["w"], m2["w"]) and not torch.equal(m1["w"], m3["w"])
    # p = 0 keeps everything: DARE reduces to task arithmetic
    m0 = merge_states(base, [x, y], MergeConfig("dare", drop_rate=0.0, scale=0.5))
    assert torch.allclose(m0["w"], 0.5 * (x["w"] + y["w"]))


@pytest.mark.parametrize(
    "cfg, n, match",
    [
        (MergeConfig("average", weights=(1.0, 2.0, 3.0)), 2, "3 weights for 2 adapters"),
        (MergeConfig("ties", weights=(1.0,)), 2, "1 weights for 2 adapters"),
        (MergeConfig("slerp"), 2, "not one of average, task-arithmetic, ties, dare"),
        (MergeConfig("ties"), 1, "at least two adapters"),
        (MergeConfig("ties", density=0.0), 2, "density"),
        (MergeConfig("dare", drop_rate=1.0), 2, "drop rate"),
        (MergeConfig("task-arithmetic", scale=-1.0), 2, "scale"),
        (MergeConfig("average", weights=(1.0, -1.0)), 2, "non-negative"),
        (MergeConfig("ties", majority_sign="vote"), 2, "majority sign"),
    ],
)
def test_bad_options_are_refused(cfg, n, match):
    with pytest.raises(MergeError, match=match):
        merge_states(BASE, [A] * n, cfg)


def test_adapters_that_do_not_match_the_base_are_refused():
    with pytest.raises(MergeError, match="missing"):
        merge_states(BASE, [A, {"w": B["w"]}], MergeConfig("average"))
    with pytest.raises(MergeError, match="shape"):
        merge_states(BASE, [A, {"w": torch.zeros(5), "b": B["b"]}], MergeConfig("average"))
    with pytest.raises(MergeError, match="NaN"):
        merge_states(BASE, [A, {"w": torch.full((4,), float("nan")), "b": B["b"]}], MergeConfig("average"))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _tiny_adapter(loaded, seed: int, blocks=(0, 3)):
    g = torch.Generator().manual_seed(seed)
    prefixes = tuple(loaded.family.block_prefix(i) for i in blocks)
    return {
        n: p.detach() + 0.01 * torch.randn(p.shape, generator=g)
        for n, p in loaded.model.named_parameters()
        if n.startswith(prefixes)
    }


def test_merge_adapters_of_a_tiny_model_round_trip_and_plug_in(tiny, tmp_path):
    a, b = _tiny_adapter(tiny, 1), _tiny_adapter(tiny, 2)
    for path, state in (("a", a), ("b", b)):
        save_adapter(tmp_path / f"{path}.safetensors", state, tiny.digest)
    adapters = [load_adapter(tmp_path / "a.safetensors"), load_adapter(tmp_path / "b.safetensors")]
    merged, meta = merge_adapters(tiny, adapters, MergeConfig("ties", density=0.3, scale=1.0))
    assert set(merged) == set(a) and meta["base_model_digest"] == tiny.digest
    assert json.loads(meta["merge"]) == {
        "method": "ties",
        "weights": None,
        "scale": 1.0,
        "density": 0.3,
        "majority_sign": "total",
    }
    params = dict(tiny.model.named_parameters())
    name = next(iter(merged))
    delta = merged[name] - params[name]
    # at most the two parents' kept 30% entries are non-zero, and each comes from a parent
    assert 0 < (delta != 0).float().mean() <= 0.6 + 1e-6
    out = tmp_path / "merged.safetensors"
    save_adapter(out, merged, meta["base_model_digest"], merge=meta["merge"])
    state, m2 = load_adapter(out)
    fresh = load_model("tiny-llama")
    model = plug_in(fresh, state, m2)
    assert torch.equal(dict(model.named_parameters())[name], merged[name])


def test_merge_adapters_refuses_another_base_naming_it(tiny):
    a, b = _tiny_adapter(tiny, 1), _tiny_adapter(tiny, 2)
    other = "f" * 64
    with pytest.raises(MergeError, match=r"release B was made for base model ffffffffffffffff"):
        merge_adapters(
            tiny,
            [(a, {"base_model_digest": tiny.digest}), (b, {"base_model_digest": other})],
            MergeConfig("average"),
            labels=["release A", "release B"],
        )
    with pytest.raises(MergeError, match="no base_model_digest"):
        merge_adapters(tiny, [(a, {"base_model_digest": tiny.digest}), (b, {})], MergeConfig("average"))


def test_merge_adapters_refuses_different_blocks_and_non_block_tensors(tiny):
    a, b = _tiny_adapter(tiny, 1, blocks=(0, 3)), _tiny_adapter(tiny, 2, blocks=(0, 2))
    meta = {"base_model_digest": tiny.digest}
    with pytest.raises(MergeError, match="same split"):
        merge_adapters(tiny, [(a, meta), (b, meta)], MergeConfig("average"))
    emb = {"model.embed_tokens.weight": tiny.model.model.embed_tokens.weight.detach().clone()}
    with pytest.raises(MergeError, match="not inside a transformer block"):
        merge_adapters(tiny, [(emb, meta), (emb, meta)], MergeConfig("average"))


def test_merge_adapters_refuses_a_model_that_no_longer_holds_its_base_weights(tiny, tmp_path):
    fresh = load_model("tiny-llama")
    a, b = _tiny_adapter(fresh, 1), _tiny_adapter(fresh, 2)
    meta = {"base_model_digest": fresh.digest}
    plug_in(fresh, a, meta)  # the deltas would now be taken from parent A, not the base
    with pytest.raises(MergeError, match="no longer holds its base weights"):
        merge_adapters(fresh, [(a, meta), (b, meta)], MergeConfig("average"))
