"""The job-option schema: typed, bounded by the admin's policy, no paths from a request."""

from __future__ import annotations

from pathlib import Path

import pytest

from offsite.server.job_options import (
    JobPolicy,
    deployment_paths,
    federation_overrides,
    validate_spec,
    validate_stored_spec,
)


def _spec(policy=None, **kw):
    base = dict(
        emulator_id="emu_x", rounds=2, min_clients=1, fraction=1.0, engine="simulation", train_config={}, options={}
    )
    base.update(kw)
    return validate_spec(policy=policy or JobPolicy(), **base)


def test_the_probes_path_options_are_refused_by_name():
    with pytest.raises(ValueError) as e:
        _spec(options={"app_dir": "/some/dir", "flwr_home": "/other/dir", "superlink": "x"})
    msg = str(e.value)
    assert "unknown options option(s)" in msg
    assert all(name in msg for name in ("'app_dir'", "'flwr_home'", "'superlink'"))
    for section, key in [
        ("options", "candidate_dir"),
        ("train_config", "candidate_dir"),
        ("train_config", "job_dir"),
        ("options", "registry_url"),
        ("train_config", "checkpoint_dir"),
    ]:
        with pytest.raises(ValueError, match=key):
            _spec(**{section: {key: "/tmp/x"}})


def test_corpus_is_never_a_server_path():
    with pytest.raises(ValueError, match="server paths are not accepted"):
        _spec(options={"corpus": "/etc/passwd"})
    assert _spec(options={"corpus": "python-reference"})["options"] == {"corpus": "python-reference"}


def test_types_and_bounds_follow_the_admins_policy():
    policy = JobPolicy(
        max_rounds=5, max_round_timeout_s=60, max_job_timeout_s=120, max_clients=3, engines=("simulation",)
    )
    with pytest.raises(ValueError, match="between 1 and 5"):
        _spec(policy, rounds=6)
    with pytest.raises(ValueError, match="not one of simulation"):
        _spec(policy, engine="deployment")
    with pytest.raises(ValueError, match="round_timeout must be between 1 and 60"):
        _spec(policy, options={"round_timeout": 61})
    with pytest.raises(ValueError, match="job_timeout"):
        _spec(policy, options={"job_timeout": 1e9})
    with pytest.raises(ValueError, match="clients"):
        _spec(policy, options={"clients": 4})
    for bad in [
        {"steps": 2.5},
        {"steps": "10"},
        {"lr": float("nan")},
        {"scheme": "top:full; rm -rf /"},
        {"batch_size": True},
    ]:
        with pytest.raises(ValueError):
            _spec(policy, train_config=bad)
    with pytest.raises(ValueError, match="secagg must be true or false"):
        _spec(policy, options={"secagg": "yes"})
    # Cross-field rules of the federation config are checked at creation, not at run time.
    with pytest.raises(ValueError, match="clipping"):
        _spec(policy, options={"dp_noise_multiplier": 1.0})


def test_a_valid_spec_maps_to_federation_fields_without_paths():
    spec = _spec(
        train_config={"steps": 20, "lr": 1e-4, "scheme": "top:full,bottom:norms"},
        options={"clients": 2, "round_timeout": 30, "norm_bound": 1.5, "secagg": True},
    )
    assert spec["train_config"] == {"steps": 20, "lr": 1e-4, "scheme": "top:full,bottom:norms"}
    fed = federation_overrides(spec)
    assert fed == {
        "local_steps": 20,
        "lr": 1e-4,
        "scheme": "top:full,bottom:norms",
        "round_timeout": 30.0,
        "norm_bound": 1.5,
        "secagg": True,
    }
    assert validate_stored_spec(spec, JobPolicy()) == spec


def test_a_stored_spec_is_checked_again_before_it_runs():
    legacy = {
        "emulator_id": "emu_x",
        "rounds": 1,
        "min_clients": 1,
        "engine": "deployment",
        "options": {"app_dir": "/some/dir"},
    }
    with pytest.raises(ValueError, match="app_dir"):
        validate_stored_spec(legacy, JobPolicy())


def test_job_timeout_is_capped_by_policy():
    policy = JobPolicy(max_job_timeout_s=100, default_round_timeout_s=600)
    assert policy.job_timeout_s({}, rounds=50) == 100
    assert policy.job_timeout_s({"job_timeout": 10}, rounds=50) == 10


def test_deployment_paths_live_under_the_data_dir(tmp_path):
    paths = deployment_paths(tmp_path, JobPolicy())
    assert paths.app_dir == tmp_path / "flower-app" and paths.flwr_home == tmp_path / "flwr-home"
    assert deployment_paths(tmp_path, JobPolicy(flwr_home=Path("/etc/flwr"))).flwr_home == Path("/etc/flwr")


def test_the_admin_sets_the_policy_in_the_data_dir(tmp_path):
    import json

    from offsite.server.job_options import load_job_policy
    from offsite.server.state import ServerConfig, ServerState

    data_dir = tmp_path / "srv"
    data_dir.mkdir()
    (data_dir / "job-policy.json").write_text(
        json.dumps({"max_rounds": 5, "engines": ["simulation"], "flwr_home": "/srv/flwr"})
    )
    state = ServerState(ServerConfig(data_dir=data_dir))
    try:
        policy = state.config.job_policy
        assert policy.max_rounds == 5 and policy.engines == ("simulation",) and str(policy.flwr_home) == "/srv/flwr"
    finally:
        state.close()
    for bad, word in [({"max_round": 5}, "unknown"), ({"max_rounds": -1}, "positive"), ({"engines": ["x"]}, "engines")]:
        (tmp_path / "p.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=word):
            load_job_policy(tmp_path / "p.json")
