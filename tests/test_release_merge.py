"""Merge requests are checked against the registry before anything is created."""

from __future__ import annotations

import pytest

from offsite.emulators.merge import MergeConfig, MergeError
from offsite.server.registry import Conflict, NotFound, Registry
from offsite.server.release_merge import plan_merge


@pytest.fixture
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path}/registry.db")
    yield r
    r.close()


def _releases(reg, *statuses, model="m1"):
    try:
        m = reg.get_model(model)
    except NotFound:
        m = reg.add_model(model, "tiny-llama", digest=model * 8)
    return [reg.create_release("", m.id, f"{i:064x}", status=s).id for i, s in enumerate(statuses)]


def test_a_valid_request_is_planned(reg):
    ids = _releases(reg, "approved", "released")
    plan = plan_merge(reg, ids, MergeConfig("ties", weights=(1.0, 2.0)))
    assert [r.id for r in plan.parents] == ids and plan.ungated == []


def test_releases_of_different_bases_are_refused_naming_both(reg):
    a = _releases(reg, "approved", model="m1")[0]
    b = _releases(reg, "approved", model="m2")[0]
    with pytest.raises(Conflict, match=rf"release {b} is of base model 'm2'.*release {a} of 'm1'"):
        plan_merge(reg, [a, b], MergeConfig("average"))


@pytest.mark.parametrize("status", ["pending-gate", "blocked"])
def test_ungated_releases_need_allow_ungated_and_an_admin(reg, status):
    ids = _releases(reg, "approved", status)
    with pytest.raises(Conflict, match=rf"{ids[1]} \({status}\).*--allow-ungated"):
        plan_merge(reg, ids, MergeConfig("average"))
    with pytest.raises(PermissionError, match="admins only"):
        plan_merge(reg, ids, MergeConfig("average"), allow_ungated=True, is_admin=False)
    plan = plan_merge(reg, ids, MergeConfig("average"), allow_ungated=True, is_admin=True)
    assert plan.ungated == [ids[1]]


def test_rejected_releases_are_never_merged(reg):
    ids = _releases(reg, "approved", "rejected")
    with pytest.raises(Conflict, match="rejected"):
        plan_merge(reg, ids, MergeConfig("average"), allow_ungated=True, is_admin=True)


@pytest.mark.parametrize(
    "ids, cfg, exc, match",
    [
        (["x"], MergeConfig("average"), ValueError, "at least two releases"),
        (["rel_a", "rel_a"], MergeConfig("average"), ValueError, "named twice"),
        (["rel_a", "../../etc"], MergeConfig("average"), ValueError, "not a release id"),
        (["rel_a", "rel_b"], MergeConfig("average", weights=(1.0, 2.0, 3.0)), MergeError, "3 weights for 2 adapters"),
        (["rel_a", "rel_b"], MergeConfig("slerp"), MergeError, "not one of"),
    ],
)
def test_bad_requests_are_refused_before_the_registry_is_read(reg, ids, cfg, exc, match):
    with pytest.raises(exc, match=match):
        plan_merge(reg, ids, cfg)


def test_unknown_release_is_named(reg):
    ids = _releases(reg, "approved")
    with pytest.raises(NotFound, match="rel_doesnotexist"):
        plan_merge(reg, [ids[0], "rel_doesnotexist"], MergeConfig("average"))
