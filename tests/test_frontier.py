"""The privacy-utility dial: the most transfer at a protection, errors that name the
reachable range or the known models, and bundles matched to their measured point."""

from __future__ import annotations

import json

import pytest

from offsite.emulators.frontier import (
    FRONTIER_FILE,
    FrontierError,
    default_build_options,
    dial_options,
    describe,
    load_frontier,
    match,
    pick,
    summary_line,
)


def _prot(full_general: float, full_own: float = 0.9) -> dict:
    return {
        "recipe": {"own_domain": 1.3, "general": 1.5},
        "recalibrated": {"own_domain": 1.2, "general": 1.45},
        "full_finetune": {"own_domain": full_own, "general": full_general},
    }


@pytest.fixture
def frontier_path(tmp_path):
    data = {
        "schema": 1,
        "models": {
            "m": {
                "named": "middle",
                "measured": {"general_short": "fortunes", "own_domain_short": "python"},
                "points": [
                    {
                        "config": "faithful",
                        "build": {"quantize": "int4", "awq": True},
                        "plugin_share": 0.95,
                        "protection": _prot(1.1),
                    },
                    {
                        "config": "middle",
                        "build": {"quantize": "int3", "awq": True},
                        "plugin_share": 0.80,
                        "protection": _prot(1.35, 0.95),
                    },
                    {
                        "config": "pruned",
                        "build": {"quantize": "int4", "awq": True, "prune_fraction": 0.5},
                        "plugin_share": 0.70,
                        "protection": _prot(1.6, 1.05),
                    },
                ],
            }
        },
    }
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny_llama_frontier(tmp_path, monkeypatch, frontier_path):
    """The test frontier installed as tiny-llama's; (signing key, a small corpus)."""
    from offsite.emulators import frontier
    from offsite.emulators.signing import generate_signing_key

    data = json.loads(frontier_path.read_text())
    data["models"]["tiny-llama"] = data["models"].pop("m")
    frontier_path.write_text(json.dumps(data))
    monkeypatch.setattr(frontier, "FRONTIER_FILE", frontier_path)
    key, _ = generate_signing_key(tmp_path / "keys")
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 100)
    return key, corpus


def test_pick_returns_the_most_transfer_at_or_above_the_protection(frontier_path):
    f = load_frontier("m", frontier_path)
    assert pick(f, 1.0).config == "faithful"
    assert pick(f, 1.3).config == "middle"
    assert pick(f, 1.5).config == "pruned"
    assert pick(f, 1.0, owner="full_finetune", held_out="own_domain").config == "pruned"
    assert pick(f, 1.25, owner="recipe", held_out="own_domain").config == "faithful"


def test_unreachable_protection_names_the_range_and_owner(frontier_path):
    f = load_frontier("m", frontier_path)
    with pytest.raises(FrontierError, match=r"reaches 1\.10x to 1\.60x: ask for at most 1\.60") as e:
        pick(f, 2.0)
    assert "fine-tunes every weight" in str(e.value)
    with pytest.raises(FrontierError, match="choose one of recipe, recalibrated, full_finetune"):
        pick(f, 1.0, owner="god")


def test_unknown_model_lists_the_known_ones(frontier_path):
    with pytest.raises(FrontierError, match="the dial knows: m"):
        load_frontier("gpt-5", frontier_path)


def test_a_bundle_config_matches_its_point_only_when_the_lossy_options_agree(frontier_path):
    f = load_frontier("m", frontier_path)
    manifest_cfg = {
        "model": "smollm2-135m",
        "quantize": "int4",
        "awq": True,
        "prune_fraction": 0.5,
        "seed": 3,
        "adapter_layers": [2, 2],
        "block_bits": None,
    }
    assert match(f, manifest_cfg).config == "pruned"
    assert match(f, {**manifest_cfg, "prune_fraction": 0.25}) is None
    assert match(f, {**manifest_cfg, "adapter_layers": [3, 3]}) is None
    line = summary_line(f, f.point("middle"))
    assert "80%" in line and "full fine-tune 0.95x / 1.35x" in line and "fortunes" in line


def test_the_named_default_is_a_frontier_point_and_gives_its_build_options(frontier_path):
    f = load_frontier("m", frontier_path)
    assert default_build_options("m", frontier_path) == {"quantize": "int3", "awq": True}
    assert describe(f, f.point("middle"))["named_default"] and not describe(f, f.point("pruned"))["named_default"]
    data = json.loads(frontier_path.read_text())
    data["models"]["m"]["named"] = None
    frontier_path.write_text(json.dumps(data))
    with pytest.raises(FrontierError, match="names no default"):
        default_build_options("m", frontier_path)


def test_the_shipped_frontier_covers_the_default_model():
    f = load_frontier("smollm2-135m", FRONTIER_FILE)
    assert f.points and all(0 < p.plugin_share <= 1.05 for p in f.points)
    # the named default: the most transfer at >= 1.3x against the strongest owner on general text
    assert f.named == pick(f, 1.3).config
    assert {"own_domain", "general"} <= set(f.points[0].protection["full_finetune"])
    assert f.measured["protocol"]["steps"] > 0 and "fortunes" in f.measured["general"]


def test_the_shipped_frontier_covers_the_second_model_and_its_dial():
    f = load_frontier("qwen2.5-coder-0.5b", FRONTIER_FILE)
    assert len(f.points) >= 2 and f.measured["protocol"]["lr"] == 5e-5  # its own lr: 5e-4 diverges
    strongest = max(p.against() for p in f.points)
    # no point reaches 1.3x against the strongest owner: the named default is the best one under it
    assert strongest < 1.3 and f.point(f.named).against() == strongest
    assert default_build_options("qwen2.5-coder-0.5b", FRONTIER_FILE) == f.point(f.named).build
    weakest = min(p.against() for p in f.points)
    chosen = dial_options("qwen2.5-coder-0.5b", weakest, {}, FRONTIER_FILE)
    assert chosen == max(f.points, key=lambda p: p.plugin_share).build
    with pytest.raises(FrontierError, match=f"ask for at most {strongest:.2f}"):
        dial_options("qwen2.5-coder-0.5b", 1.3, {}, FRONTIER_FILE)


def test_cli_protection_dial_errors_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from offsite.emulators.signing import generate_signing_key
    from offsite.server.cli.main import app

    key, _ = generate_signing_key(tmp_path / "keys")
    out = tmp_path / "bundle"

    def build(*args):
        return CliRunner().invoke(
            app, ["emulators", "local", "build", "--signing-key", str(key), "--out", str(out), "--json", *args]
        )

    r = build("--protection", "99")
    assert r.exit_code != 0 and "the frontier reaches" in r.output and "ask for at most" in r.output
    r = build("--protection", "1.0", "--quantize", "int3")
    assert r.exit_code != 0 and "drop --quantize" in r.output
    r = build("--model", "tiny-llama", "--protection", "1.0")
    assert r.exit_code != 0 and "the dial knows:" in r.output and "smollm2-135m" in r.output
    assert not out.exists()


def test_cli_inspect_shows_the_measured_protection_of_a_frontier_configuration(tmp_path, tiny_llama_frontier):
    """A bundle built with a frontier point's options shows that point's protection."""
    from typer.testing import CliRunner

    from offsite.server.cli.main import app

    key, corpus = tiny_llama_frontier
    run = CliRunner().invoke
    r = run(
        app,
        [
            "emulators",
            "local",
            "build",
            "--model",
            "tiny-llama",
            "--protection",
            "1.3",
            "--corpus",
            str(corpus),
            "--block-size",
            "64",
            "--signing-key",
            str(key),
            "--out",
            str(tmp_path / "b"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["manifest"]["build"]["config"]["quantize"] == "int3"  # the "middle" point
    r = run(app, ["emulators", "local", "inspect", str(tmp_path / "b"), "--json"])
    measured = json.loads(r.output)["measured_protection"]
    assert measured["config"] == "middle" and measured["protection"]["full_finetune"]["general"] == 1.35
    r = run(app, ["emulators", "local", "inspect", str(tmp_path / "b")])
    assert "full fine-tune 0.95x / 1.35x" in r.output.replace("\n", " ")


def test_cli_build_without_lossy_options_builds_the_named_default(tmp_path, tiny_llama_frontier):
    """What `emulators local build` ships by default is the frontier's named point; naming any
    lossy option (even `--quantize none`) builds exactly what was named."""
    from typer.testing import CliRunner

    from offsite.server.cli.main import app

    key, corpus = tiny_llama_frontier

    def build(out: str, *args: str) -> dict:
        common = ["--model", "tiny-llama", "--corpus", str(corpus), "--block-size", "64", "--signing-key", str(key)]
        r = CliRunner().invoke(
            app, ["emulators", "local", "build", *common, "--out", str(tmp_path / out), "--json", *args]
        )
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["manifest"]["build"]["config"]

    named = build("default")
    assert (named["quantize"], named["awq"]) == ("int3", True)  # the fixture's named point "middle"
    lossless = build("lossless", "--quantize", "none")
    assert (lossless["quantize"], lossless["awq"], lossless["prune_fraction"]) == ("none", False, 0.0)
