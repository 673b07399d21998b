"""Bundles: round trip, quantized loading, and verification that fails closed, naming the file."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import tarfile

import pytest
import torch

from offsite.emulators.build import BuildConfig, Corpus, model_fp32_bytes, prepare_emulator
from offsite.emulators.data import Example, tokenize_examples
from offsite.emulators.bundle import (
    BundleError,
    load_bundle,
    read_manifest_unverified,
    verify_bundle,
    write_bundle,
)
from offsite.emulators.models import load_model
from offsite.emulators.signing import (
    SigningKeyError,
    generate_signing_key,
    load_private_key,
    load_public_key,
)
from offsite.emulators.split import build_emulator_model, plan_split

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_signing_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return generate_signing_key(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory, keys, loaded):
    """A dropped-layer, unquantized tiny-llama bundle."""
    plan = plan_split(8, (2, 2), 3)
    emulator = build_emulator_model(loaded, plan)
    out = tmp_path_factory.mktemp("b") / "bundle"
    write_bundle(
        out,
        emulator,
        plan,
        tokenizer=loaded.tokenizer,
        base_model_id="tiny-llama",
        base_digest=loaded.digest,
        signing_key=keys[0],
    )
    return out, emulator


@pytest.fixture
def bundle_copy(plain_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(plain_bundle[0], dst)
    return dst


# --- keys ----------------------------------------------------------------------------


def test_keys_are_pem_mode_600_and_never_overwritten(tmp_path):
    key, pub = generate_signing_key(tmp_path / "k")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = key.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_signing_key(tmp_path / "k")
    assert key.read_bytes() == before
    generate_signing_key(tmp_path / "k", force=True)
    assert key.read_bytes() != before
    with pytest.raises(SigningKeyError, match="public key"):
        load_private_key(pub)
    with pytest.raises(SigningKeyError, match="private key"):
        load_public_key(key)
    with pytest.raises(SigningKeyError, match="no such"):
        load_private_key(tmp_path / "missing.key")


# --- round trip ------------------------------------------------------------------------


def test_round_trip_reproduces_the_emulator_and_lists_every_file(plain_bundle, keys, loaded):
    out, emulator = plain_bundle
    manifest = verify_bundle(out, keys[1])
    names = {p.name for p in out.iterdir()} - {"manifest.json", "manifest.sig"}
    assert set(manifest["files"]) == names
    assert {"emulator.safetensors", "adapter.safetensors", "config.json", "tokenizer.json"} <= names
    assert manifest["base_model"]["digest"] == loaded.digest
    assert [b["origin"] for b in manifest["blocks"]] == [0, 1, 2, 4, 5, 6, 7]
    assert [b["role"] for b in manifest["blocks"]] == ["adapter"] * 2 + ["emulator"] * 3 + ["adapter"] * 2
    bundle = load_bundle(out, keys[1])
    assert bundle.adapter_positions == [0, 1, 5, 6]
    assert bundle.base_digest == loaded.digest
    with torch.no_grad():
        assert torch.equal(bundle.model(IDS).logits, emulator(IDS).logits)
    # No pickle: every weight file is safetensors.
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())


def test_adapter_state_is_keyed_by_original_names(plain_bundle, keys, loaded):
    bundle = load_bundle(plain_bundle[0], keys[1])
    state = bundle.adapter_state()
    original = dict(loaded.model.named_parameters())
    expected = {n for n in original if loaded.family.block_index(n) in (0, 1, 6, 7)}
    assert set(state) == expected
    for name, tensor in state.items():
        assert torch.equal(tensor, original[name])
    changed = {k: v + 0.5 for k, v in state.items()}
    bundle.load_adapter_state(changed)
    params = dict(bundle.model.named_parameters())
    assert torch.equal(params["model.layers.5.mlp.up_proj.weight"], changed["model.layers.6.mlp.up_proj.weight"])
    with pytest.raises(BundleError, match="not an adapter parameter"):
        bundle.load_adapter_state({"model.layers.3.mlp.up_proj.weight": torch.zeros(128, 64)})
    with pytest.raises(BundleError, match="shape"):
        bundle.load_adapter_state({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, strict=False)
    with pytest.raises(BundleError, match="lacks"):
        bundle.load_adapter_state({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)})


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-opt"])
def test_other_families_round_trip(name, keys, tmp_path):
    loaded = load_model(name)
    plan = plan_split(8, (2, 2))
    emulator = build_emulator_model(loaded, plan)
    write_bundle(
        tmp_path / "b",
        emulator,
        plan,
        tokenizer=loaded.tokenizer,
        base_model_id=name,
        base_digest=loaded.digest,
        signing_key=keys[0],
    )
    bundle = load_bundle(tmp_path / "b", keys[1])
    with torch.no_grad():
        assert torch.equal(bundle.model(IDS).logits, loaded.model(IDS).logits)


def test_quantized_bundle_loads_quant_shells_and_matches_memory(keys, loaded, tmp_path):
    from offsite.emulators.quantize import QuantLinear

    cfg = BuildConfig(model="tiny-llama", quantize="int4", awq=True, block_size=64)
    blocks = tokenize_examples([Example("", "def f(x):\n    return x * 2\n" * 40)], loaded.tokenizer, 64)
    emulator, plan, block_quant, _ = prepare_emulator(
        cfg, loaded, corpus=Corpus(blocks, blocks, "test"), progress=False
    )
    manifest = write_bundle(
        tmp_path / "q",
        emulator,
        plan,
        tokenizer=loaded.tokenizer,
        base_model_id="tiny-llama",
        base_digest=loaded.digest,
        signing_key=keys[0],
        block_quant=block_quant,
        embeddings="int8",
        adapter_dtype="fp16",
    )
    assert manifest["quantization"] == {"middle": "int4+awq", "embeddings": "int8", "adapter": "fp16"}
    assert [b["quantization"]["bits"] if b["quantization"] else None for b in manifest["blocks"]] == [
        None,
        None,
        4,
        4,
        4,
        4,
        None,
        None,
    ]
    bundle = load_bundle(tmp_path / "q", keys[1])
    blocks = bundle.family.get_blocks(bundle.model)
    assert isinstance(blocks[3].mlp.up_proj, QuantLinear) and blocks[3].mlp.up_proj.input_scale is not None
    assert isinstance(blocks[0].mlp.up_proj, torch.nn.Linear) and blocks[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(IDS).logits, emulator(IDS).logits, rtol=1e-5, atol=1e-5)
    size = sum(f["size"] for f in read_manifest_unverified(tmp_path / "q")["files"].values())
    assert size < 0.5 * model_fp32_bytes(loaded.model)  # the bundle really shrinks


def test_low_bit_embeddings_round_trip_exactly(keys, loaded, tmp_path):
    plan = plan_split(8, (2, 2))
    emulator = build_emulator_model(loaded, plan)
    manifest = write_bundle(
        tmp_path / "e",
        emulator,
        plan,
        tokenizer=loaded.tokenizer,
        base_model_id="tiny-llama",
        base_digest=loaded.digest,
        signing_key=keys[0],
        embeddings="int3",
    )
    assert manifest["storage"]["encoded"]["model.embed_tokens.weight"]["bits"] == 3
    emb = emulator.get_input_embeddings().weight
    assert not torch.equal(emb, loaded.model.get_input_embeddings().weight)  # lossy, in place
    assert emulator.get_output_embeddings().weight is emb  # still tied
    bundle = load_bundle(tmp_path / "e", keys[1])
    assert torch.equal(bundle.model.get_input_embeddings().weight, emb)
    with torch.no_grad():
        assert torch.equal(bundle.model(IDS).logits, emulator(IDS).logits)


# --- verification fails closed ---------------------------------------------------------


def _flip_byte(path, offset=-10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _tamper_changed(b):
    _flip_byte(b / "emulator.safetensors")
    return "emulator.safetensors"


def _tamper_truncated(b):
    p = b / "adapter.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return "adapter.safetensors"


def _tamper_extra(b):
    (b / "evil.py").write_text("print('hi')")
    return "evil.py"


def _tamper_missing(b):
    (b / "tokenizer.json").unlink()
    return "tokenizer.json"


def _tamper_unsigned(b):
    (b / "manifest.sig").unlink()
    return "manifest.sig"


def _tamper_bad_signature(b):
    (b / "manifest.sig").write_bytes(base64.b64encode(os.urandom(64)))
    return "manifest.sig"


def _tamper_manifest(b):
    m = json.loads((b / "manifest.json").read_text())
    m["base_model"]["id"] = "someone-else"
    (b / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return "manifest.sig"


def _tamper_resigned_other_key(b, other_key):
    from offsite.emulators.signing import sign

    data = (b / "manifest.json").read_bytes()
    (b / "manifest.sig").write_bytes(base64.b64encode(sign(load_private_key(other_key), data)))
    return "manifest.sig"


TAMPERS = [
    _tamper_changed,
    _tamper_truncated,
    _tamper_extra,
    _tamper_missing,
    _tamper_unsigned,
    _tamper_bad_signature,
    _tamper_manifest,
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda f: f.__name__[8:])
def test_every_tamper_fails_closed_naming_the_file(tamper, bundle_copy, keys):
    name = tamper(bundle_copy)
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        verify_bundle(bundle_copy, keys[1])
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(bundle_copy, keys[1])


def test_truncation_is_called_truncation(bundle_copy, keys):
    _tamper_truncated(bundle_copy)
    with pytest.raises(BundleError, match="truncated"):
        verify_bundle(bundle_copy, keys[1])


def test_wrong_key_and_other_signer_fail(bundle_copy, keys, other_keys):
    with pytest.raises(BundleError, match="wrong public key"):
        verify_bundle(bundle_copy, other_keys[1])
    _tamper_resigned_other_key(bundle_copy, other_keys[0])
    with pytest.raises(BundleError, match="manifest.sig"):
        verify_bundle(bundle_copy, keys[1])
    with pytest.raises(BundleError, match="no such public key"):
        verify_bundle(bundle_copy, bundle_copy / "nope.pub")


def test_no_public_key_is_refused_unless_the_local_copy_is_trusted(bundle_copy, keys):
    with pytest.raises(BundleError, match="no public key"):
        load_bundle(bundle_copy, None)
    assert load_bundle(bundle_copy, None, trust_local_copy=True).plan.middle_kept == [2, 4, 5]
    _tamper_changed(bundle_copy)
    with pytest.raises(BundleError, match="emulator.safetensors"):
        load_bundle(bundle_copy, None, trust_local_copy=True)  # hashes are still checked


def test_a_swap_after_verification_is_caught_at_load(bundle_copy, keys, monkeypatch):
    # load_bundle hashes the bytes it deserialises, so a file replaced between the
    # listing check and the read is still refused.
    import offsite.emulators.bundle_format as bundle_format

    real = bundle_format.check_listing

    def listing_then_swap(root, manifest):
        files = real(root, manifest)
        _flip_byte(root / "emulator.safetensors")
        return files

    monkeypatch.setattr(bundle_format, "check_listing", listing_then_swap)
    with pytest.raises(BundleError, match="emulator.safetensors"):
        load_bundle(bundle_copy, keys[1])


# --- tar -------------------------------------------------------------------------------


def test_tar_of_a_bundle_verifies_and_loads(plain_bundle, keys, tmp_path):
    tar_path = tmp_path / "bundle.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(plain_bundle[0], arcname="bundle")
    assert verify_bundle(tar_path, keys[1])["format"] == "offsite-bundle/1"
    bundle = load_bundle(tar_path, keys[1])
    with torch.no_grad():
        assert torch.equal(bundle.model(IDS).logits, plain_bundle[1](IDS).logits)
    flat = tmp_path / "flat.tar"
    with tarfile.open(flat, "w") as tf:
        for p in sorted(plain_bundle[0].iterdir()):
            tf.add(p, arcname=p.name)
    verify_bundle(flat, keys[1])


def _tar_with(tmp_path, plain_dir, member: tarfile.TarInfo, data: bytes = b""):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for p in sorted(plain_dir.iterdir()):
            tf.add(p, arcname=p.name)
        tf.addfile(member, io.BytesIO(data) if data else None)
    return path


def test_tar_path_traversal_and_links_are_refused(plain_bundle, keys, tmp_path):
    m = tarfile.TarInfo("../escaped.txt")
    m.size = 3
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(_tar_with(tmp_path, plain_bundle[0], m, b"abc"), keys[1])
    assert not (tmp_path.parent / "escaped.txt").exists()
    link = tarfile.TarInfo("link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(BundleError, match="link"):
        verify_bundle(_tar_with(tmp_path, plain_bundle[0], link), keys[1])


# --- atomic writes -----------------------------------------------------------------------


def test_existing_out_is_refused_and_failures_leave_nothing(plain_bundle, keys, loaded, tmp_path):
    plan = plan_split(8, (2, 2))
    emulator = build_emulator_model(loaded, plan)
    kw = dict(tokenizer=loaded.tokenizer, base_model_id="tiny-llama", base_digest=loaded.digest)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(plain_bundle[0], emulator, plan, signing_key=keys[0], **kw)
    verify_bundle(plain_bundle[0], keys[1])  # untouched
    with pytest.raises(SigningKeyError):
        write_bundle(tmp_path / "x", emulator, plan, signing_key=keys[1], **kw)  # a public key cannot sign
    with pytest.raises(BundleError, match="must stay fp32"):
        write_bundle(tmp_path / "x", emulator, plan, signing_key=keys[0], block_quant={0: {"bits": 4}}, **kw)
    assert list(tmp_path.iterdir()) == []
