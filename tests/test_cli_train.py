"""`offsite-client train`: verifies the bundle first, trains, writes the adapter, prints JSON."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from offsite.client.cli import app
from offsite.emulators.adapter import load_adapter
from offsite.emulators.build import BuildConfig, build_bundle
from offsite.emulators.signing import generate_signing_key

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-train")
    key, pub = generate_signing_key(root / "keys")
    build_bundle(
        BuildConfig(model="tiny-llama", adapter_layers=(2, 2), emulator_layers=2), key, root / "bundle", progress=False
    )
    data = root / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"}) + "\n" for i in range(16))
    )
    return root / "bundle", pub, data


def _args(bundle_dir, pub, data, out, *extra):
    return [
        "train",
        "--bundle",
        str(bundle_dir),
        "--public-key",
        str(pub),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
        "--no-progress",
        *extra,
    ]


def test_train_writes_adapter_and_json(bundle, tmp_path):
    bundle_dir, pub, data = bundle
    out = tmp_path / "adapter.safetensors"
    result = runner.invoke(app, _args(bundle_dir, pub, data, out, "--scheme", "top", "--json"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout[result.stdout.index("{") :])
    for key in ("scheme", "peak_rss_mb", "tokens_per_s", "loss_first", "loss_last"):
        assert key in record
    state, meta = load_adapter(out)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert meta["base_model_digest"] == manifest["base_model"]["digest"]
    # keyed by the ORIGINAL model's block indices: tiny-llama has 8 blocks, adapter = 0, 1, 6, 7
    assert {k.split(".")[2] for k in state} == {"0", "1", "6", "7"}


def test_refuses_tampered_bundle(bundle, tmp_path):
    import shutil

    bundle_dir, pub, data = bundle
    bad = tmp_path / "tampered"
    shutil.copytree(bundle_dir, bad)
    blob = bytearray((bad / "emulator.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "emulator.safetensors").write_bytes(bytes(blob))
    out = tmp_path / "adapter.safetensors"
    result = runner.invoke(app, _args(bad, pub, data, out))
    assert result.exit_code != 0
    assert "refusing to train" in result.output and "emulator.safetensors" in result.output
    assert not out.exists()


def test_bad_data_names_file_and_line(bundle, tmp_path):
    bundle_dir, pub, _ = bundle
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    result = runner.invoke(app, _args(bundle_dir, pub, data, tmp_path / "a.safetensors"))
    assert result.exit_code != 0
    assert f"{data}:2" in result.output


def test_scheme_and_budget_exclude_each_other(bundle, tmp_path):
    bundle_dir, pub, data = bundle
    result = runner.invoke(
        app, _args(bundle_dir, pub, data, tmp_path / "a.safetensors", "--scheme", "top", "--memory-budget", "600MB")
    )
    assert result.exit_code != 0 and "exclude each other" in result.output
