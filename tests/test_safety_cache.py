"""The output cache across gate runs: a later candidate pays only its own side, and nothing
stale is ever read (a changed model, suite or decoding setting misses)."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from offsite.emulators.models import LoadedModel, load_model
from offsite.safety_evals.cache import OutputCache
from offsite.safety_evals.runner import Side, run_eval
from offsite.safety_evals.suite import SUITES_DIR
from offsite.safety_evals.worker import Worker

SUITES = ["disallowed_content", "capability_general"]
LIMIT = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _nudged(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A copy with every matrix perturbed: another candidate, another weight digest."""
    model = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 1e-2 * p.abs().mean())
    return loaded.with_weights(model, f"{loaded.model_id}+{seed}")


@pytest.fixture(scope="module")
def models(one_thread):
    torch.manual_seed(0)
    base = load_model("tiny-llama")
    return base, _nudged(base, 1), _nudged(base, 2)


def _sides(report: dict, suite: str) -> dict:
    return next(s for s in report["suites"] if s["name"] == suite)["timing"]["sides"]


def _run(cand, base, suites, cache):
    return run_eval(cand, base, suites, LIMIT, cache.parent / "out", progress=False, cache_dir=cache, write=False)


def test_a_later_candidate_pays_only_its_own_side(models, tmp_path):
    base, first, second = models
    cache = tmp_path / "cache"
    r1 = _run(first, base, SUITES, cache)
    for name in SUITES:
        sides = _sides(r1, name)
        assert sides["base"]["misses"] == sides["candidate"]["misses"] == LIMIT  # a cold cache: both sides work
    gen = _sides(r1, "disallowed_content")["candidate"]
    assert gen["prompt_tokens"] > 0 and 0 < gen["generated_tokens"] <= LIMIT * 16
    assert _sides(r1, "capability_general")["base"]["loss_tokens"] > 0

    r2 = _run(second, base, SUITES, cache)
    for name in SUITES:
        sides = _sides(r2, name)
        assert sides["base"] == {**sides["base"], "hits": LIMIT, "misses": 0, "model_s": 0.0, "prompt_tokens": 0}
        assert sides["candidate"]["misses"] == LIMIT and sides["candidate"]["model_s"] > 0
        s1 = next(s for s in r1["suites"] if s["name"] == name)
        s2 = next(s for s in r2["suites"] if s["name"] == name)
        assert s2["base"]["value"] == s1["base"]["value"]  # the cached base outputs are the same outputs


def test_a_changed_suite_or_setting_misses(models, tmp_path):
    base, first, _ = models
    cache = tmp_path / "cache"
    _run(first, base, ["disallowed_content"], cache)
    spec = yaml.safe_load((SUITES_DIR / "disallowed_content.yaml").read_text())
    spec["dataset"] = str(SUITES_DIR / spec["dataset"])
    variants = {
        "wrapper": {"prompting": {**spec["prompting"], "wrapper": "Please answer: {prompt}"}},
        "system": {"prompting": {**spec["prompting"], "system_prompt": "You are a careful assistant."}},
        "tokens": {"generation": {"max_new_tokens": 12}},
    }
    for what, change in variants.items():
        path = tmp_path / f"variant_{what}.yaml"
        path.write_text(yaml.safe_dump({**spec, "name": f"variant_{what}", **change}))
        sides = _sides(_run(first, base, [str(path)], cache), f"variant_{what}")
        assert sides["base"]["misses"] == sides["candidate"]["misses"] == LIMIT, what
    # The unchanged suite still reads everything from the cache.
    sides = _sides(_run(first, base, ["disallowed_content"], cache), "disallowed_content")
    assert sides["base"]["misses"] == sides["candidate"]["misses"] == 0


def test_a_changed_model_digest_misses_and_an_equal_one_hits(models, tmp_path):
    base, first, _ = models
    cache = OutputCache(tmp_path / "cache")
    timing = {"model_s": 0.0}

    def worker(loaded):
        return Worker(Side("base", "tiny", loaded), cache, 4, timing, lambda n: None)

    prompts = ["Hello there", "How do I sort a list?", "Tell me a secret"]
    pairs = [("ctx", " a"), ("", "plain text")]
    w = worker(base)
    out = w.generate(prompts, 6)
    w.losses(pairs)
    assert w.stats["misses"] == len(prompts) + len(pairs)

    again = worker(base)  # same weights (same digest): everything is read back
    assert again.generate(prompts, 6) == out
    again.losses(pairs)
    assert again.stats["hits"] == len(prompts) + len(pairs) and again.stats["misses"] == 0

    other = worker(first)  # other weights: nothing is shared
    other.generate(prompts, 6)
    other.losses(pairs)
    assert other.stats["misses"] == len(prompts) + len(pairs) and other.stats["hits"] == 0

    # A new cache object on the same directory (a later process) sees the entries on disk.
    later = Worker(Side("base", "tiny", base), OutputCache(tmp_path / "cache"), 4, {"model_s": 0.0}, lambda n: None)
    assert later.generate(prompts, 6) == out and later.stats["misses"] == 0
