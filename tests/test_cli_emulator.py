"""The model owner's CLI: keys init, emulator build/verify/inspect, plugin; bad input leaves nothing behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offsite.emulators.bundle import load_bundle
from offsite.emulators.adapter import save_adapter
from offsite.server.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    r = invoke("keys", "init", "--dir", d, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    return out["signing_key"], out["signing_pub"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus file keeps AWQ calibration fast."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 4}) for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tiny(keys, corpus, out, *options, block_size: str = "64", expect_ok: bool = True):
    """`emulators local build --model tiny-llama ... --json`: (result, manifest or None)."""
    r = invoke(
        "emulators",
        "local",
        "build",
        "--model",
        "tiny-llama",
        *options,
        "--corpus",
        corpus,
        "--block-size",
        block_size,
        "--signing-key",
        keys[0],
        "--out",
        out,
        "--json",
    )
    if not expect_ok:
        return r, None
    assert r.exit_code == 0, r.output
    return r, json.loads(r.stdout.strip().splitlines()[-1])["manifest"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, keys, corpus):
    out = tmp_path_factory.mktemp("b") / "bundle"
    options = ("--adapter-layers", "2,2", "--emulator-layers", "3", "--quantize", "int4", "--awq")
    return out, build_tiny(keys, corpus, out, *options)[1]


def test_keys_init_mode_and_refusal(tmp_path):
    r = invoke("keys", "init", "--dir", tmp_path / "k")
    assert r.exit_code == 0, r.output
    key = tmp_path / "k" / "signing.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    before = key.read_bytes()
    r = invoke("keys", "init", "--dir", tmp_path / "k")
    assert r.exit_code != 0 and "already exists" in r.output and "--force" in r.output
    assert key.read_bytes() == before
    assert invoke("keys", "init", "--dir", tmp_path / "k", "--force").exit_code == 0
    assert key.read_bytes() != before


def test_build_writes_a_bundle_that_verifies_and_inspects(bundle, keys):
    out, manifest = bundle
    assert [b["origin"] for b in manifest["blocks"]] == [0, 1, 2, 4, 5, 6, 7]
    assert manifest["quantization"]["middle"] == "int4+awq"
    r = invoke("emulators", "local", "verify", out, "--public-key", keys[1])
    assert r.exit_code == 0 and "OK" in r.output
    r = invoke("emulators", "local", "inspect", out, "--json", "--public-key", keys[1])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["verified"] and info["layer_origin"] == [0, 1, 2, 4, 5, 6, 7]
    assert [b["role"] for b in info["blocks"]].count("adapter") == 4
    assert info["files"]["emulator.safetensors"]["sha256"] == manifest["files"]["emulator.safetensors"]["sha256"]
    r = invoke("emulators", "local", "inspect", out)
    assert r.exit_code == 0 and "original block" in r.output and "not verified" in r.output


def test_verify_reports_a_tampered_file(bundle, keys, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle[0], copy)
    data = bytearray((copy / "emulator.safetensors").read_bytes())
    data[-5] ^= 1
    (copy / "emulator.safetensors").write_bytes(bytes(data))
    r = invoke("emulators", "local", "verify", copy, "--public-key", keys[1])
    assert r.exit_code == 1 and "emulator.safetensors" in r.output and "FAILED" in r.output
    r = invoke("emulators", "local", "verify", copy, "--public-key", keys[1], "--json")
    assert json.loads(r.stdout)["ok"] is False


def _bad_build(tmp_path, keys, corpus, **overrides):
    args = {
        "--model": "tiny-llama",
        "--signing-key": keys[0],
        "--out": tmp_path / "out",
        "--corpus": corpus,
        "--block-size": "64",
    }
    args.update(overrides)
    flat = [x for kv in args.items() for x in kv if x is not None]
    return invoke("emulators", "local", "build", *flat), args["--out"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"--model": "no-such-model"}, "unknown model"),
        ({"--emulator-layers": "7"}, "only 8 blocks"),
        ({"--adapter-layers": "5,5"}, "only 8 blocks"),
        ({"--adapter-layers": "2"}, "two numbers"),
        ({"--quantize": "int5"}, "int5"),
        ({"--signing-key": "MISSING"}, "no such signing key"),
        ({"--signing-key": "PUB"}, "public key"),
        ({"--corpus": "TINY"}, "fewer than one block"),
        ({"--out": "UNDER_FILE"}, "cannot write"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_nothing(tmp_path, keys, corpus, overrides, needle):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x = 1\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    subst = {"MISSING": tmp_path / "missing.key", "PUB": keys[1], "TINY": tiny, "UNDER_FILE": blocker / "out"}
    overrides = {k: subst.get(v, v) for k, v in overrides.items()}
    r, out = _bad_build(tmp_path, keys, corpus, **overrides)
    assert r.exit_code != 0
    assert needle in r.output, r.output
    assert not os.path.exists(out)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_build_refuses_an_existing_out(bundle, keys, corpus):
    out, manifest = bundle
    r, _ = build_tiny(keys, corpus, out, expect_ok=False)
    assert r.exit_code != 0 and "already exists" in r.output
    assert json.loads((out / "manifest.json").read_text())["created_at"] == manifest["created_at"]


def test_plugin_cli_exports_a_loadable_model_and_refuses_another_base(bundle, keys, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = bundle
    b = load_bundle(out, keys[1])
    state = {k: v + 0.01 for k, v in b.adapter_state().items()}
    save_adapter(tmp_path / "adapter.safetensors", state, b.base_digest)
    r = invoke(
        "plugin",
        "--model",
        "tiny-llama",
        "--adapter",
        tmp_path / "adapter.safetensors",
        "--out",
        tmp_path / "cand",
        "--bundle",
        out,
        "--public-key",
        keys[1],
        "--json",
    )
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cand", local_files_only=True)
    params = dict(model.named_parameters())
    name = "model.layers.7.mlp.down_proj.weight"
    assert torch.equal(params[name], state[name])
    # The same adapter against another base model: refused, nothing written.
    r = invoke(
        "plugin", "--model", "tiny-gpt2", "--adapter", tmp_path / "adapter.safetensors", "--out", tmp_path / "cand2"
    )
    assert r.exit_code != 0 and "made for base model" in r.output
    assert not (tmp_path / "cand2").exists()


def test_build_with_distillation_then_quantization(tmp_path, keys, corpus):
    pytest.importorskip("offsite.emulators.distill")
    out = tmp_path / "distilled"
    options = ("--emulator-layers", "2", "--distill-steps", "2", "--quantize", "int8")
    _, manifest = build_tiny(keys, corpus, out, *options, block_size="32")
    assert manifest["build"]["distill"]["steps"] == 2
    assert [b["origin"] for b in manifest["blocks"]] == [0, 1, 2, 5, 6, 7]
    assert manifest["quantization"]["middle"] == "int8"
    # The distillation checkpoint is gone once the bundle is written.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled"]
    bundle = load_bundle(out, keys[1])
    with torch.no_grad():
        assert torch.isfinite(bundle.model(torch.randint(0, 256, (1, 16))).logits).all()


def test_demo_runs_end_to_end_on_a_tiny_model_and_resumes(tmp_path):
    args = [
        "demo",
        "--work-dir",
        tmp_path / "demo",
        "--model",
        "tiny-llama",
        "--quantize",
        "int4",
        "--no-awq",
        "--steps",
        "2",
        "--block-size",
        "64",
        "--eval-blocks",
        "4",
        "--no-export",
        "--rounds",
        "0",
        "--json",
    ]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res["ppl"]) == {"full_zero_shot", "emulator_zero_shot", "emulator_finetuned", "plugin"}
    assert res["stages"] == ["keys", "bundle", "verify", "zero-shot", "fine-tune", "plug-in"]
    assert all(Path(res["paths"][k]).exists() for k in ("keys", "bundle", "adapter", "results"))
    assert all(v > 1 for v in res["ppl"].values())
    assert (tmp_path / "demo" / "keys" / "signing.key").exists() and (
        tmp_path / "demo" / "adapter.safetensors"
    ).exists()
    created = json.loads((tmp_path / "demo" / "bundle" / "manifest.json").read_text())["created_at"]
    again = json.loads(invoke(*args).stdout.strip().splitlines()[-1])
    assert again["training"] == {"reused": True}
    assert json.loads((tmp_path / "demo" / "bundle" / "manifest.json").read_text())["created_at"] == created
    assert again["ppl"]["plugin"] == pytest.approx(res["ppl"]["plugin"])


def test_mixed_precision_per_block(tmp_path, keys, corpus):
    out = tmp_path / "mixed"
    _, manifest = build_tiny(keys, corpus, out, "--quantize", "int4", "--block-bits", "3:2,4:8,5:0")
    bits = {b["origin"]: (b["quantization"] or {}).get("bits") for b in manifest["blocks"]}
    assert bits == {0: None, 1: None, 2: 4, 3: 2, 4: 8, 5: None, 6: None, 7: None}
    assert manifest["quantization"]["middle"] == "mixed"
    assert manifest["config"]["num_hidden_layers"] == 8
    bundle = load_bundle(out, keys[1])
    assert bundle.block_quant[3]["bits"] == 2


def test_unknown_family_names_the_supported_ones(tmp_path, keys, corpus):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from offsite.emulators.models import byte_tokenizer

    model_dir = tmp_path / "neox"
    config = GPTNeoXConfig(
        vocab_size=259, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    r, out = _bad_build(tmp_path, keys, corpus, **{"--model": str(model_dir)})
    assert r.exit_code != 0 and "gpt_neox" in r.output and "llama" in r.output, r.output
    assert not out.exists()


def test_demo_rounds_end_in_a_gated_release_and_resume(tmp_path):
    """Stages 7-8: federated rounds on the demo's bundle, then the gate; a capped eval fails closed."""
    from offsite.server.registry import Registry

    args = [
        "demo",
        "--work-dir",
        tmp_path / "demo",
        "--model",
        "tiny-llama",
        "--quantize",
        "int4",
        "--no-awq",
        "--steps",
        "1",
        "--block-size",
        "64",
        "--eval-blocks",
        "2",
        "--no-export",
        "--rounds",
        "1",
        "--clients",
        "2",
        "--local-steps",
        "1",
        "--eval-limit",
        "1",
        "--gate-suites",
        "capability_general",
        "--json",
    ]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    fed = res["federation"]
    assert res["stages"][-2:] == ["federation", "gate"]
    # what Ray and Flower print goes to the log the summary names, not to the user's terminal
    assert res["paths"]["library_log"] == str(tmp_path / "demo" / "demo.log")
    # (whether Flower prints at all depends on how earlier tests left its logger, so the check
    # is that none of its lines reached the user's output, and that the named log exists)
    assert Path(res["paths"]["library_log"]).is_file()
    assert "INFO :" not in r.output and "FutureWarning" not in r.output, r.output
    assert [x["clients"] for x in fed["rounds"]] == [2]
    # one item per suite is not a full run: the default policy blocks it, and the release says so
    assert fed["gate"]["verdict"] == "block" and fed["release"]["status"] == "blocked"
    assert any("limit" in reason for reason in fed["gate"]["reasons"])
    registry = Registry(f"sqlite:///{tmp_path / 'demo' / 'federation' / 'registry.db'}")
    try:
        row = registry.get_release(fed["release"]["id"])
        assert (row.status, row.gate_verdict) == ("blocked", "block")
    finally:
        registry.close()
    assert (tmp_path / "demo" / "gate" / "report.html").exists()
    again = json.loads(invoke(*args).stdout.strip().splitlines()[-1])["federation"]
    assert again["job_id"] == fed["job_id"]  # the finished job is reused, not run again
