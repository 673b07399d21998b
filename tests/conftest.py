"""Shared test set-up: tiny models only, quiet libraries, no network."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run fastest on one thread (no OpenMP hand-offs on small matrices).
torch.set_num_threads(1)


@pytest.fixture
def offsite_cache(tmp_path, monkeypatch):
    """A private model cache directory for tests that convert or cache models."""
    path = tmp_path / "cache"
    monkeypatch.setenv("OFFSITE_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_lowbit_bundle(tmp_path_factory):
    """make(quantize) -> (bundle dir, (signing key, public key)): a signed tiny-llama bundle as the product ships
    them (an AWQ low-bit middle, int8 vocabulary rows, fp16 adapter), built once per quantize."""
    from offsite.emulators.build import BuildConfig, Corpus, prepare_emulator
    from offsite.emulators.bundle import write_bundle
    from offsite.emulators.data import Example, tokenize_examples
    from offsite.emulators.models import load_model
    from offsite.emulators.signing import generate_signing_key

    built: dict[str, tuple] = {}

    def make(quantize: str = "int4"):
        if quantize not in built:
            keys = generate_signing_key(tmp_path_factory.mktemp("keys"))
            loaded = load_model("tiny-llama")
            blocks = tokenize_examples([Example("", "def f(x):\n    return x * 2\n" * 40)], loaded.tokenizer, 64)
            cfg = BuildConfig(model="tiny-llama", quantize=quantize, awq=True, block_size=64)
            emulator, plan, block_quant, _ = prepare_emulator(
                cfg, loaded, corpus=Corpus(blocks, blocks, "test"), progress=False
            )
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
                embeddings="int8",
                adapter_dtype="fp16",
            )
            built[quantize] = (out, keys)
        return built[quantize]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module, whatever an earlier test set: on a shared, oversubscribed
    CPU two OpenMP threads spin-wait for each other and run ~40x slower than one; one thread is
    never much slower for the tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _finetune_to(loaded, prompts: list[str], response: str, steps: int, lr: float = 1e-2):
    """A copy of `loaded` trained to answer every prompt with `response` (loss on the answer only)."""
    torch.manual_seed(0)
    model = copy.deepcopy(loaded.model)
    model.train()
    tok = loaded.tokenizer
    target = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = [tok(p, add_special_tokens=False)["input_ids"] + target for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, len(r) - len(target) : len(r)] = torch.tensor(target)
        mask[i, : len(r)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    return loaded.with_weights(model, f"{loaded.model_id}+{response[:8]}")


@pytest.fixture(scope="session")
def finetune_to():
    """_finetune_to: the safety tests' way to make a candidate that answers a fixed way."""
    return _finetune_to
