"""The engine's own AdamW / SGD / schedule follow torch.optim step for step."""

from __future__ import annotations

import pytest
import torch

from offsite.client.engine import optim


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=g)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 6, generator=g)
    return w, x, y


def _run(make_opt, make_sched, steps: int = 12):
    w0, x, y = _problem()
    p = torch.nn.Parameter(w0.clone())
    opt = make_opt([p])
    sched = make_sched(opt)
    lrs = []
    for _ in range(steps):
        loss = ((x @ p.t() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return p.detach(), lrs


def factor(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.9**step


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch(wd):
    ours, lr_a = _run(lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=wd), lambda o: optim.LambdaSchedule(o, factor))
    ref, lr_b = _run(
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=wd),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert lr_a == pytest.approx(lr_b)
    assert not torch.equal(ours, _problem()[0])  # it moved


def test_sgd_matches_torch():
    ours, _ = _run(lambda ps: optim.SGD(ps, lr=0.05, weight_decay=0.01), lambda o: optim.LambdaSchedule(o, factor))
    ref, _ = _run(
        lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.01),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_resumes_exactly():
    w0, x, y = _problem()

    def steps(p, opt, sched, n):
        for _ in range(n):
            ((x @ p.t() - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    a = torch.nn.Parameter(w0.clone())
    oa = optim.AdamW([a], lr=0.05)
    sa = optim.LambdaSchedule(oa, factor)
    steps(a, oa, sa, 8)

    b = torch.nn.Parameter(w0.clone())
    ob = optim.AdamW([b], lr=0.05)
    sb = optim.LambdaSchedule(ob, factor)
    steps(b, ob, sb, 4)
    saved_opt, saved_sched, saved_w = ob.state_dict(), sb.state_dict(), b.detach().clone()
    c = torch.nn.Parameter(saved_w)
    oc = optim.AdamW([c], lr=0.05)
    oc.load_state_dict(saved_opt)
    sc = optim.LambdaSchedule(oc, factor)
    sc.load_state_dict(saved_sched)
    steps(c, oc, sc, 4)
    torch.testing.assert_close(c.detach(), a.detach(), rtol=0, atol=0)


def test_empty_and_mismatched_states_are_refused():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.AdamW([])
    o = optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="saved optimizer state has 2 parameters"):
        o.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1], "lr": 1.0}]})
