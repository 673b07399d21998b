"""The lean runtime computes what transformers computes, without importing its model classes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from offsite.emulators.bundle import BundleError, load_bundle, write_bundle
from offsite.emulators.lean import LeanTokenizer, supports
from offsite.emulators.models import load_model
from offsite.emulators.split import build_emulator_model, plan_split


@pytest.fixture(scope="module")
def keys(tiny_lowbit_bundle):
    """(signing key, public key) of the int4 bundle's signer."""
    return tiny_lowbit_bundle("int4")[1]


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def quant_bundle(tiny_lowbit_bundle):
    """A tiny-llama bundle with an int4 + AWQ middle and int8 vocabulary rows."""
    return tiny_lowbit_bundle("int4")[0]


def _batch():
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return ids, mask


def test_lean_logits_match_transformers_on_a_quantized_bundle(quant_bundle, keys):
    hf = load_bundle(quant_bundle, keys[1], runtime="transformers")
    lean = load_bundle(quant_bundle, keys[1], runtime="lean")
    assert type(lean.model).__module__ == "offsite.emulators.lean"
    assert dict(hf.model.named_parameters()).keys() == dict(lean.model.named_parameters()).keys()
    ids, mask = _batch()
    with torch.no_grad():
        a = hf.model(input_ids=ids, attention_mask=mask).logits
        b = lean.model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    valid[2, :5] = False  # fully padded queries are never scored; their outputs are undefined
    assert torch.allclose(a[valid], b[valid], atol=1e-4, rtol=1e-4), (a[valid] - b[valid]).abs().max()
    # and the adapter is keyed by the same original names
    assert hf.adapter_state().keys() == lean.adapter_state().keys()


def test_lean_gradients_match_transformers(quant_bundle, keys):
    grads = []
    for runtime in ("transformers", "lean"):
        b = load_bundle(quant_bundle, keys[1], runtime=runtime)
        ids, _ = _batch()
        out = b.model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        top = b.family.get_blocks(b.model)[b.adapter_positions[-1]]
        grads.append(top.mlp.up_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_bf16_vocabulary_still_gives_an_fp32_forward(quant_bundle, keys):
    b = load_bundle(quant_bundle, keys[1], runtime="lean", vocab_dtype=torch.bfloat16)
    assert b.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert b.model.lm_head.weight is b.model.model.embed_tokens.weight  # still tied
    ids, mask = _batch()
    with torch.no_grad():
        logits = b.model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_lean_tokenizer_matches_the_transformers_tokenizer(quant_bundle, keys):
    hf = load_bundle(quant_bundle, keys[1], runtime="transformers").tokenizer
    lean = load_bundle(quant_bundle, keys[1], runtime="lean").tokenizer
    assert isinstance(lean, LeanTokenizer)
    for text in ("def f(x):\n    return x", "héllo wörld <|im_end|>", ""):
        assert lean(text, add_special_tokens=False)["input_ids"] == hf(text, add_special_tokens=False)["input_ids"]
    assert (lean.eos_token_id, lean.pad_token_id) == (hf.eos_token_id, hf.pad_token_id)
    messages = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]
    for gen in (False, True):
        assert lean.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=gen
        ) == hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=gen)
    assert lean.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(messages, tokenize=False)


def test_auto_falls_back_to_transformers_where_lean_does_not_apply(keys, tmp_path):
    gpt2 = load_model("tiny-gpt2")
    plan = plan_split(8, (2, 2), 3)
    out = tmp_path / "bundle"
    write_bundle(
        out,
        build_emulator_model(gpt2, plan),
        plan,
        tokenizer=gpt2.tokenizer,
        base_model_id="tiny-gpt2",
        base_digest=gpt2.digest,
        signing_key=keys[0],
    )
    assert "model_type" in supports({"model_type": "gpt2"})
    b = load_bundle(out, keys[1], runtime="auto")
    assert type(b.model).__module__.startswith("transformers.")
    with pytest.raises(BundleError, match="lean runtime cannot run this model"):
        load_bundle(out, keys[1], runtime="lean")
    with pytest.raises(BundleError, match="runtime must be one of"):
        load_bundle(out, keys[1], runtime="fast")


def test_a_lean_client_process_never_imports_transformers_models(quant_bundle, keys):
    code = (
        "import sys, json, torch\n"
        "from offsite.emulators.bundle import load_bundle\n"
        "from offsite.client.engine import TrainConfig, train_adapter\n"
        "from offsite.emulators.data import Example\n"
        f"b = load_bundle({str(quant_bundle)!r}, {str(keys[1])!r}, runtime='auto')\n"
        "r = train_adapter(b, [Example('', 'x = [1, 2, 3]\\n' * 60)], TrainConfig(scheme='top', steps=2, block_size=32,"
        " batch_size=2, eval_fraction=0.2), progress=False)\n"
        "print(json.dumps({'heavy': sorted(m for m in sys.modules if m.startswith(('transformers.models', 'torch._dynamo', 'sympy'))),"
        " 'loss': r.metrics['loss_last']}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [] and out["loss"] > 0
