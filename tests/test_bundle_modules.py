"""The bundle and quantization modules as a client sees them: loading a quantized bundle
imports the stored format only (never the owner's calibration or the bundle writer), and
the old import paths still name the same objects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from offsite.emulators.models import load_model
from offsite.emulators.signing import generate_signing_key
from offsite.emulators.split import build_emulator_model, plan_split


@pytest.fixture(scope="module")
def quant_bundle(tmp_path_factory):
    from offsite.emulators.bundle import write_bundle
    from offsite.emulators.calibrate import quantize_module

    keys = generate_signing_key(tmp_path_factory.mktemp("keys"))
    loaded = load_model("tiny-llama")
    plan = plan_split(8, (2, 2))
    emulator = build_emulator_model(loaded, plan)
    blocks = emulator.model.layers
    block_quant = {}
    for pos in range(len(blocks)):
        if plan.role(pos) != "adapter":
            quantize_module(blocks[pos], 4)
            block_quant[pos] = {"bits": 4, "group_size": 64, "awq": False}
    out = tmp_path_factory.mktemp("b") / "bundle"
    write_bundle(
        out,
        emulator,
        plan,
        tokenizer=loaded.tokenizer,
        base_model_id="tiny-llama",
        base_digest=loaded.digest,
        signing_key=keys[0],
        block_quant=block_quant,
        embeddings="int4",
    )
    return out, keys[1]


@pytest.mark.parametrize("runtime", ["lean", "transformers"])
def test_loading_imports_the_stored_format_only(quant_bundle, runtime):
    out, pub = quant_bundle
    code = (
        "import sys, json\n"
        "from offsite.emulators.bundle_load import load_bundle\n"
        "from offsite.emulators.lowbit import QuantLinear\n"
        f"b = load_bundle({str(out)!r}, {str(pub)!r}, runtime={runtime!r})\n"
        "n = sum(isinstance(m, QuantLinear) for m in b.model.modules())\n"
        "print(json.dumps({'quant': n, 'mods': sorted(m for m in sys.modules if m.startswith('offsite.'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["quant"] > 0
    for owner_only in (
        "offsite.emulators.calibrate",
        "offsite.emulators.quantize",
        "offsite.emulators.bundle_write",
        "offsite.emulators.build",
        "offsite.emulators.distill",
    ):
        assert owner_only not in seen["mods"]


def test_old_import_paths_name_the_same_objects():
    from offsite.emulators import (
        bundle,
        bundle_format,
        bundle_load,
        bundle_write,
        calibrate,
        lowbit,
        quantize,
        vocab_codec,
    )

    assert bundle.load_bundle is bundle_load.load_bundle and bundle.write_bundle is bundle_write.write_bundle
    assert bundle.verify_bundle is bundle_format.verify_bundle and bundle.BundleError is bundle_format.BundleError
    assert bundle.encode_vocab_matrices is vocab_codec.encode_vocab_matrices
    assert quantize.QuantLinear is lowbit.QuantLinear and quantize.quantize_module is calibrate.quantize_module
    assert set(quantize.__all__) <= set(dir(quantize)) and set(bundle.__all__) <= set(dir(bundle))


def test_data_and_losses_do_not_import_each_other_in_a_circle():
    import ast
    from pathlib import Path

    import offsite.emulators.losses as losses

    tree = ast.parse(Path(losses.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "data" not in imported and not any(m and m.endswith(".data") for m in imported)
    from offsite.emulators import data

    assert data.perplexity is losses.perplexity and data.IGNORE_INDEX == losses.IGNORE_INDEX == -100
