"""Memory budget: the choice fits the budget; below the minimum the error names the minimum."""

from __future__ import annotations

import re

import pytest

from offsite.client.engine import BudgetError, EngineTarget, TrainConfig, parse_memory, parse_scheme, train_model
from offsite.emulators.data import Example
from offsite.emulators.models import load_model

ADAPTER = [6, 7]  # two trainable blocks keep the probes few
TEXT = [Example("", ("while x < %d:\n    x += 1\n" % i) * 8, f"t:{i}") for i in range(24)]


def _target():
    lm = load_model("tiny-llama")
    return EngineTarget(lm.model, lm.tokenizer, lm.family, ADAPTER)


def _cfg(budget):
    return TrainConfig(
        memory_budget_mb=budget, steps=2, lr=1e-2, block_size=32, batch_size=2, precision="fp32", probe_steps=1
    )


def test_budget_below_minimum_names_the_minimum_and_choice_fits(monkeypatch):
    from offsite.client.engine import budget

    # the process's resident size drifts as tests run; pin the fixed part so budgets are comparable
    monkeypatch.setattr(budget, "current_rss_mb", lambda: 300.0)
    with pytest.raises(BudgetError, match=r"below the minimum .*: \d+ MB") as info:
        train_model(_target(), TEXT, _cfg(1.0), progress=False)
    minimum = int(re.search(r"minimum for this model and data: (\d+) MB", str(info.value)).group(1))
    lines: list[str] = []
    r = train_model(_target(), TEXT, _cfg(minimum + 0.2), progress=False, log=lines.append)
    b = r.metrics["budget"]
    assert b["estimate_mb"] <= minimum + 0.2
    assert lines and lines[-1].startswith("chose")  # the choice and why are printed
    chosen = [u for u in b["units"] if u["chosen"]]
    assert chosen and r.metrics["scheme"] == b["spec"]
    parse_scheme(b["spec"], ADAPTER)  # the chosen scheme is a valid, reproducible spec
    # a generous budget affords at least as much estimated memory
    big = train_model(_target(), TEXT, _cfg(minimum + 500), progress=False).metrics["budget"]
    assert big["estimate_mb"] >= b["estimate_mb"]


def test_the_top_block_trains_in_full_whenever_it_fits(monkeypatch):
    """The probes' few steps rank a whole block low; the choice keeps it whenever the budget holds it."""
    from offsite.client.engine import budget

    monkeypatch.setattr(budget, "current_rss_mb", lambda: 300.0)
    # probes that say training the whole top block makes things worse, and anything else helps
    real_eval = budget._eval_loss

    def eval_loss(model, family, cfg, device, dtype, batch, positions):
        nll, n = real_eval(model, family, cfg, device, dtype, batch, positions)
        top = family.get_blocks(model)[max(positions)]
        whole = all(p.requires_grad for p in top.parameters())
        return nll + (n if whole else -n) * 0.5, n

    monkeypatch.setattr(budget, "_eval_loss", eval_loss)
    lines: list[str] = []
    b = train_model(_target(), TEXT, _cfg(1000.0), progress=False, log=lines.append).metrics["budget"]
    units = {u["unit"]: u for u in b["units"]}
    others = [u["gain"] for name, u in units.items() if name != "7:full" and u["gain"] is not None]
    assert units["7:full"]["gain"] < min(others)  # the probes rank it last...
    assert units["7:full"]["chosen"] and "7:full" in b["spec"]  # ...and it trains all the same
    assert "block 7 in full (it fits)" in lines[-1]


def test_parse_memory():
    assert parse_memory("600MB") == 600
    assert parse_memory("1.5GB") == 1536
    with pytest.raises(BudgetError):
        parse_memory("lots")
    assert parse_memory("auto") == parse_memory(" AUTO ") == "auto"


@pytest.mark.parametrize("fixed", [300.0, 900.0])
def test_auto_budget_is_the_measured_minimum_plus_the_margin_on_any_machine(monkeypatch, fixed):
    """Whatever this machine's runtime floor, "auto" never trips the minimum: it is derived from it."""
    from offsite.client.engine import budget

    monkeypatch.setattr(budget, "current_rss_mb", lambda: fixed)
    lines: list[str] = []
    b = train_model(_target(), TEXT, _cfg("auto"), progress=False, log=lines.append).metrics["budget"]
    assert b["budget_mb"] == pytest.approx(b["minimum_mb"] + budget.AUTO_MARGIN_MB, abs=0.1)
    assert b["minimum_mb"] > fixed and b["estimate_mb"] <= b["budget_mb"]
    assert any(line.startswith("memory budget auto:") for line in lines)


def test_a_low_block_whose_backward_cannot_fit_is_not_even_measured(monkeypatch):
    """Measuring backward depth from the bottom of a deep emulator would itself break the budget."""
    from offsite.client.engine import budget

    monkeypatch.setattr(budget, "current_rss_mb", lambda: 300.0)
    lm = load_model("tiny-llama")
    target = EngineTarget(lm.model, lm.tokenizer, lm.family, [0, 7])  # six frozen blocks between them
    with pytest.raises(BudgetError) as info:
        train_model(target, TEXT, _cfg(1.0), progress=False)
    minimum = int(re.search(r"minimum for this model and data: (\d+) MB", str(info.value)).group(1))
    b = train_model(target, TEXT, _cfg(minimum + 0.5), progress=False).metrics["budget"]
    assert b["depth_mb"]["7"] > 0 and b["depth_mb"]["0"] is None
    assert all(u["unit"].startswith("7:") for u in b["units"] if u["chosen"])
