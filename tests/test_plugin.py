"""Plug-in by name: exactly the adapter's tensors land in the full model; wrong bases are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.emulators.adapter import AdapterError, load_adapter, save_adapter
from offsite.emulators.bundle import load_bundle, write_bundle
from offsite.emulators.models import load_model
from offsite.emulators.plugin import export_model_dir, plug_in
from offsite.emulators.signing import generate_signing_key
from offsite.emulators.split import build_emulator_model, plan_split

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_signing_key(tmp_path_factory.mktemp("keys"))


def _perturbed_adapter(name: str, keys, tmp_path, kept):
    """Build a dropped-layer bundle, perturb its adapter on the emulator, return it by original name."""
    loaded = load_model(name)
    plan = plan_split(8, (2, 2), kept=kept)
    write_bundle(
        tmp_path / "bundle",
        build_emulator_model(loaded, plan),
        plan,
        tokenizer=loaded.tokenizer,
        base_model_id=name,
        base_digest=loaded.digest,
        signing_key=keys[0],
    )
    bundle = load_bundle(tmp_path / "bundle", keys[1])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in bundle.adapter_modules():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return bundle, bundle.adapter_state()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_plug_in_puts_exactly_the_adapter_tensors_into_the_full_model(name, keys, tmp_path):
    bundle, state = _perturbed_adapter(name, keys, tmp_path, kept=[4])  # adapter at emulator positions 0,1,3,4
    fresh = load_model(name)
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    model = plug_in(fresh, state, {"base_model_digest": bundle.base_digest})
    after = dict(model.named_parameters())
    family = fresh.family
    assert {family.block_index(n) for n in state} == {0, 1, 6, 7}  # original indices, not emulator positions
    for n, p in after.items():
        if n in state:
            assert torch.equal(p, state[n]), n
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # everything else untouched


def test_plug_in_refuses_another_base_and_bad_tensors(keys, tmp_path):
    bundle, state = _perturbed_adapter("tiny-llama", keys, tmp_path, kept=[3])
    gpt2 = load_model("tiny-gpt2")
    with pytest.raises(AdapterError, match="made for base model"):
        plug_in(gpt2, state, {"base_model_digest": bundle.base_digest})
    llama = load_model("tiny-llama")
    snapshot = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    meta = {"base_model_digest": llama.digest}
    with pytest.raises(AdapterError, match="no base_model_digest"):
        plug_in(llama, state, {})
    with pytest.raises(AdapterError, match="does not exist"):
        plug_in(llama, {**state, "model.layers.99.mlp.up_proj.weight": torch.zeros(1)}, meta)
    with pytest.raises(AdapterError, match="not inside a transformer block"):
        plug_in(llama, {**state, "model.embed_tokens.weight": torch.zeros(259, 64)}, meta)
    with pytest.raises(AdapterError, match="shape"):
        plug_in(llama, {**state, "model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, meta)
    with pytest.raises(AdapterError, match="NaN"):
        plug_in(llama, {**state, "model.layers.0.mlp.up_proj.weight": torch.full((128, 64), float("nan"))}, meta)
    with pytest.raises(AdapterError, match="missing"):
        some = dict(list(state.items())[:3])
        plug_in(llama, some, meta, expected_names=set(state))
    # A refused adapter changes nothing.
    assert all(torch.equal(p, snapshot[n]) for n, p in llama.model.named_parameters())


def test_export_loads_with_plain_transformers_and_is_atomic(keys, tmp_path):
    _, state = _perturbed_adapter("tiny-llama", keys, tmp_path, kept=None)
    save_adapter(tmp_path / "adapter.safetensors", state, load_model("tiny-llama").digest)
    state, meta = load_adapter(tmp_path / "adapter.safetensors")
    loaded = load_model("tiny-llama")
    model = plug_in(loaded, state, meta)
    out = export_model_dir(model, loaded.tokenizer, tmp_path / "candidate", provenance={"adapter": "x"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    assert (out / "offsite-plugin.json").exists()
    assert not any(p.suffix in (".bin", ".pt") for p in out.iterdir())
    with pytest.raises(AdapterError, match="already exists"):
        export_model_dir(model, loaded.tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
