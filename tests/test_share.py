"""Layer sharing (CRaSh): contiguous clusters of similar middle blocks, one kept block per
cluster repeated in its slots (depth unchanged), and a bundle that stores it once."""

from __future__ import annotations

import json

import pytest
import torch

from offsite.emulators.data import TokenBlocks
from offsite.emulators.models import load_model
from offsite.emulators.quantize import quantize_module
from offsite.emulators.share import (
    ShareError,
    apply_sharing,
    contiguous_clusters,
    linear_cka,
    medoid,
    share_map,
)
from offsite.emulators.split import build_emulator_model, plan_split


def _blocks(n=8, size=32, seed=0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (n, size), generator=g)
    return TokenBlocks(ids, ids.clone(), torch.ones_like(ids))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_linear_cka_sees_rotations_and_scale_as_the_same_representation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-4)
    assert linear_cka(x, torch.randn(500, 16, generator=g)) < 0.2


def test_clusters_are_contiguous_runs_of_similar_blocks_with_a_medoid_each():
    # three groups of alike blocks: 0-1, 2-4, 5
    groups = [0, 0, 1, 1, 1, 2]
    sim = torch.tensor([[0.9 if a == b else 0.2 for b in groups] for a in groups])
    sim.fill_diagonal_(1.0)
    sim[3, 2] = sim[2, 3] = sim[3, 4] = sim[4, 3] = 0.95  # block 3 is the centre of its group
    runs = contiguous_clusters(sim, 3)
    assert runs == [[0, 1], [2, 3, 4], [5]]
    assert medoid([2, 3, 4], sim) == 3
    assert contiguous_clusters(sim, 6) == [[i] for i in range(6)]
    with pytest.raises(ShareError, match="choose 1..6"):
        contiguous_clusters(sim, 7)


def test_share_map_keeps_depth_and_the_copies_are_bit_identical_after_rounding(tiny):
    plan = plan_split(8, (2, 2))  # middle positions 2..5
    emu = build_emulator_model(tiny, plan)
    before = {n: t.clone() for n, t in emu.state_dict().items()}
    sources = share_map(emu, tiny.family, plan, _blocks(), unique=2, n_batches=2)
    assert len(sources) == 2 and set(sources) | set(sources.values()) <= set(plan.emulator_positions)
    assert not set(sources) & set(sources.values())  # a kept block repeats nothing
    blocks = tiny.family.get_blocks(emu)
    for pos in plan.emulator_positions:
        quantize_module(blocks[pos], 4, 32)
    apply_sharing(emu, tiny.family, sources)
    assert len(blocks) == 8  # depth unchanged
    for slot, src in sources.items():
        mine, theirs = blocks[slot].state_dict(), blocks[src].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    distinct = {pos: blocks[pos].state_dict() for pos in plan.emulator_positions if pos not in sources}
    assert len(distinct) == 2
    # the adapter blocks are untouched
    for n, t in emu.state_dict().items():
        if n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.6.", "model.layers.7.")):
            assert torch.equal(t, before[n])
    with pytest.raises(ShareError, match="between 1 and 4"):
        share_map(emu, tiny.family, plan, _blocks(), unique=5)


def test_sharing_blocks_of_different_precision_is_refused(tiny):
    plan = plan_split(8, (2, 2))
    emu = build_emulator_model(tiny, plan)
    blocks = tiny.family.get_blocks(emu)
    quantize_module(blocks[2], 4, 32)  # block 3 stays fp32
    with pytest.raises(ShareError, match="same precision"):
        apply_sharing(emu, tiny.family, {3: 2})


def test_a_shared_bundle_stores_each_block_once_and_loads_the_repeats(tiny, tmp_path):
    from safetensors import safe_open

    from offsite.emulators.build import BuildConfig, BuildError, build_bundle
    from offsite.emulators.bundle import load_bundle
    from offsite.emulators.bundle_format import EMULATOR_WEIGHTS
    from offsite.emulators.signing import generate_signing_key

    keys = generate_signing_key(tmp_path / "keys")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    common = dict(model="tiny-llama", quantize="int4", awq=True, block_size=64, corpus=str(corpus))
    plain = build_bundle(BuildConfig(**common), keys[0], tmp_path / "plain", progress=False, loaded=tiny)
    manifest = build_bundle(
        BuildConfig(**common, share_unique=2), keys[0], tmp_path / "shared", progress=False, loaded=tiny
    )
    repeats = {b["position"]: b["repeats"] for b in manifest["blocks"] if "repeats" in b}
    assert len(repeats) == 2 and manifest["build"]["shared_blocks"] == {str(k): v for k, v in repeats.items()}
    with safe_open(str(tmp_path / "shared" / EMULATOR_WEIGHTS), "pt") as f:
        names = list(f.keys())
    for slot in repeats:
        assert not [n for n in names if n.startswith(f"model.layers.{slot}.")]
    size = manifest["files"][EMULATOR_WEIGHTS]["size"]
    assert size < 0.8 * plain["files"][EMULATOR_WEIGHTS]["size"]

    bundle = load_bundle(tmp_path / "shared", keys[1])
    state = bundle.model.state_dict()
    assert bundle.family.num_layers(bundle.model.config) == 8
    for slot, src in repeats.items():
        for n, t in state.items():
            if n.startswith(f"model.layers.{src}."):
                assert torch.equal(state[n.replace(f"layers.{src}.", f"layers.{slot}.")], t)
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(bundle.model(input_ids=ids).logits).all()

    with pytest.raises(BuildError, match="cannot be combined"):
        BuildConfig(**common, share_unique=2, elevate_margin=0.3).validate()
    with pytest.raises(BuildError, match=">= 1"):
        BuildConfig(**common, share_unique=0).validate()


def test_a_manifest_that_repeats_an_adapter_block_is_refused(tiny, tmp_path):
    from offsite.emulators.build import BuildConfig, build_bundle
    from offsite.emulators.bundle_format import MANIFEST, BundleError
    from offsite.emulators.bundle_load import _load_bundle
    from offsite.emulators.signing import generate_signing_key

    keys = generate_signing_key(tmp_path / "keys")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    cfg = BuildConfig(model="tiny-llama", quantize="int4", block_size=64, corpus=str(corpus), share_unique=3)
    build_bundle(cfg, keys[0], tmp_path / "b", progress=False, loaded=tiny)
    path = tmp_path / "b" / MANIFEST
    manifest = json.loads(path.read_text())
    entry = next(b for b in manifest["blocks"] if "repeats" in b)
    entry["repeats"] = 0  # an adapter block
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not another stored middle block"):
        _load_bundle(tmp_path / "b", None, None, check_signature=False)


def test_cli_build_share_and_inspect_shows_the_repeats(tmp_path):
    from typer.testing import CliRunner

    from offsite.server.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "keys"), "--json"], catch_exceptions=False)
    key = json.loads(r.output)["signing_key"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    args = ["emulators", "local", "build", "--model", "tiny-llama", "--quantize", "int4", "--corpus", str(corpus)]
    args += ["--block-size", "64", "--signing-key", key, "--share", "2", "--prune", "0.25"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout.strip().splitlines()[-1])["manifest"]
    assert manifest["build"]["config"]["share_unique"] == 2 and manifest["build"]["config"]["prune_fraction"] == 0.25
    assert sum("repeats" in b for b in manifest["blocks"]) == 2
    r = runner.invoke(app, ["emulators", "local", "inspect", str(tmp_path / "b")], catch_exceptions=False)
    assert r.exit_code == 0 and r.output.count("stored once") == 2, r.output
    r = runner.invoke(app, [*args[:-2], "--share", "9", "--out", str(tmp_path / "c")], catch_exceptions=False)
    assert r.exit_code != 0 and "between 1 and 4" in r.output and not (tmp_path / "c").exists()
