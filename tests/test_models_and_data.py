"""Model loading, the family registry, data reading and the chunked loss."""

from __future__ import annotations

import json

import pytest
import torch

from offsite.emulators.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    load_examples,
    python_reference_split,
    tokenize_examples,
)
from offsite.emulators.families import UnknownFamilyError, family_for
from offsite.emulators.losses import causal_lm_nll
from offsite.emulators.models import TINY_MODELS, ModelNotFoundError, load_model


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_load_with_their_family(name):
    lm = load_model(name)
    family = lm.family
    blocks = family.get_blocks(lm.model)
    assert len(blocks) == family.num_layers(lm.model.config) == 8
    names = dict(lm.model.named_parameters())
    assert any(n.startswith(family.block_prefix(7)) for n in names)
    assert family.block_index(family.block_prefix(3) + "x.weight") == 3
    # Same name, same weights, same digest: bundles can name their base model.
    assert load_model(name).digest == lm.digest


@pytest.mark.parametrize("name", TINY_MODELS)
def test_chunked_loss_matches_transformers(name):
    lm = load_model(name)
    blocks = tokenize_examples(python_reference_split(1).heldout[:2], lm.tokenizer, block_size=64)
    ids, labels, mask = blocks.input_ids[:2], blocks.labels[:2], blocks.attention_mask[:2]
    reference = lm.model(input_ids=ids, labels=labels, attention_mask=mask).loss
    nll, n = causal_lm_nll(lm.model, ids, labels, mask, chunk_tokens=17)
    assert torch.allclose(nll / n, reference, atol=1e-5)


def test_unknown_model_and_family_are_named():
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_model("no-such-model")
    from transformers import BertConfig

    with pytest.raises(UnknownFamilyError, match="bert"):
        family_for(BertConfig())


def test_python_reference_split_is_deterministic_and_disjoint():
    a, b = python_reference_split(3), python_reference_split(3)
    assert [[e.source for e in s] for s in a.shards] == [[e.source for e in s] for s in b.shards]
    sources = [e.source for s in a.shards for e in s]
    held = {e.source for e in a.heldout}
    assert len(sources) == len(set(sources)) and not held & set(sources)
    assert all(len(s) > 0 for s in a.shards)


def test_jsonl_shapes_and_completion_only_labels(tmp_path):
    lm = load_model("tiny-llama")
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "plain text " * 20},
        {"prompt": "Q: 2+2?", "completion": " 4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_examples(path, lm.tokenizer)
    assert [bool(e.prompt) for e in examples] == [False, True, True]
    blocks = tokenize_examples(examples[1:], lm.tokenizer, block_size=64)
    learnt = [lm.tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in blocks.labels.tolist()]
    assert learnt[0].startswith(" 4") and "Q:" not in learnt[0]
    assert learnt[1].startswith("hello") and "user" not in learnt[1]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b'{"text": "ok"}\n{"oops": 1}\n', r"d.jsonl:2"),
        (b"not json\n", r"d.jsonl:1: invalid JSON"),
        (b'{"text": "\xff\xfe"}\n', "not UTF-8"),
        (b'{"messages": [{"role": "user", "content": "x"}]}\n', "assistant"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_too_little_data_for_one_block():
    lm = load_model("tiny-llama")
    with pytest.raises(DataError, match="fewer than one block"):
        tokenize_examples([Example("", "too short")], lm.tokenizer, block_size=64)
