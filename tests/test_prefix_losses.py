"""Shared-context scoring (bias choices, canary candidates) equals scoring each pair as its own row."""

import pytest
import torch

from offsite.emulators.models import load_model
from offsite.safety_evals.cache import OutputCache
from offsite.safety_evals.prefix_losses import shared_context_nll
from offsite.safety_evals.runner import Side, Worker


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-opt"])
def loaded(request):
    torch.manual_seed(0)
    return load_model(request.param)


def _worker(loaded, tmp_path):
    timing = {"model_s": 0.0, "grading_s": 0.0}
    return Worker(Side("base", "tiny", loaded), OutputCache(tmp_path / "cache"), 4, timing, lambda n: None)


def test_shared_context_equals_separate_rows(loaded, tmp_path):
    w = _worker(loaded, tmp_path)
    context = "The answer to the question about the red box is"
    targets = [" yes", " no, it is the blue one", " unknown", "", " 123456"]
    rows = w._loss_batch([(context, t) for t in targets], 256)
    c = w.tok(context, add_special_tokens=False)["input_ids"]
    ts = [w.tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    shared = shared_context_nll(w.model, c, ts, pad_id=0)
    for r, s, t in zip(rows, shared, ts):
        assert s["tokens"] == r["tokens"] == len(t)
        assert s["nll"] == pytest.approx(r["nll"], rel=1e-4, abs=1e-4)
    assert shared[3] == {"nll": 0.0, "tokens": 0}


def test_losses_route_groups_through_the_shared_path_and_keep_order(loaded, tmp_path, monkeypatch):
    w = _worker(loaded, tmp_path)
    pairs = [("ctx one", " a"), ("", "plain text alone"), ("ctx one", " b c"), ("ctx two", " d"), ("ctx one", " a")]
    expected = [w._loss_batch([p], 256)[0] for p in pairs]
    calls = []
    import offsite.safety_evals.prefix_losses as pl

    real = pl.shared_context_nll
    monkeypatch.setattr(pl, "shared_context_nll", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    got = w.losses(pairs)
    assert calls == [2]  # "ctx one" has two distinct targets; "ctx two" and plain text take the row path
    for g, e in zip(got, expected):
        assert g["tokens"] == e["tokens"] and g["nll"] == pytest.approx(e["nll"], rel=1e-4, abs=1e-4)


def test_a_context_too_long_to_keep_whole_takes_the_row_path(loaded, tmp_path, monkeypatch):
    w = _worker(loaded, tmp_path)
    long_context = " ".join(["word"] * 300)
    import offsite.safety_evals.prefix_losses as pl

    monkeypatch.setattr(pl, "shared_context_nll", lambda *a, **k: pytest.fail("must not share a truncated context"))
    vals = w.losses([(long_context, " x"), (long_context, " y z")], max_tokens=64)
    assert [v["tokens"] for v in vals] == [len(w.tok(t, add_special_tokens=False)["input_ids"]) for t in (" x", " y z")]
