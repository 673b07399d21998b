"""Training and evaluation data: files users bring, and the built-in corpus.

Accepted inputs
- JSONL, one object per line, with ``text``; or ``prompt`` + ``completion``; or chat
  ``messages`` (a list of ``{"role", "content"}``). Loss is taken on completion/assistant
  tokens only for the last two shapes.
- Plain text files (``.txt``, ``.md``): the whole file is one ``text`` example.
- A directory: every ``*.jsonl``, ``*.txt`` and ``*.md`` file in it, sorted by name.
- ``python-reference``: the Python language reference that ships with CPython
  (``pydoc_data.topics``), split by topic into non-IID data-owner shards and a held-out
  set, deterministically.

Errors name the file and line and say what shape was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.files import JsonlError, read_jsonl

from .losses import IGNORE_INDEX, perplexity  # noqa: F401  (perplexity lives beside the loss; re-exported)

PYTHON_REFERENCE = "python-reference"
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Input data is missing, unreadable or wrongly shaped; the message names file and line."""


@dataclass(frozen=True)
class Example:
    """One training example: ``prompt`` is context only (no loss), ``completion`` is learnt."""

    prompt: str
    completion: str
    source: str = ""  # "file:line" or "python-reference:topic", for error messages and audits


# --- reading -----------------------------------------------------------------------


def load_examples(path: str | Path, tokenizer=None) -> list[Example]:
    """Read a data file or directory into examples (``tokenizer`` renders chat messages)."""
    if str(path) == PYTHON_REFERENCE:
        split = python_reference_split(n_shards=1)
        return split.shards[0]
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{p}: no such file or directory; pass a JSONL/text file, a directory of them, or {PYTHON_REFERENCE!r}"
        )
    files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".txt", ".md")) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{p}: the directory holds no .jsonl, .txt or .md files")
    examples: list[Example] = []
    for f in files:
        examples.extend(_read_jsonl(f, tokenizer) if f.suffix in (".jsonl", ".json") else _read_text(f))
    if not examples:
        raise DataError(f"{p}: no examples found (the file is empty); add at least one line of data")
    return examples


def _read_text(path: Path) -> list[Example]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t utf-8`") from None
    return [Example("", text, f"{path}")] if text.strip() else []


def _read_jsonl(path: Path, tokenizer) -> list[Example]:
    try:
        return [example_from_record(obj, where, tokenizer) for where, obj in read_jsonl(path)]
    except JsonlError as e:
        raise DataError(str(e)) from None


def example_from_record(obj, where: str, tokenizer=None) -> Example:
    """One JSON record in any accepted shape -> Example."""
    shapes = 'expected {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role", "content"}, ...]}'
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a JSON {type(obj).__name__}, {shapes}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return Example("", obj["text"], where)
    if "prompt" in obj or "completion" in obj:
        if not (isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str)):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        return Example(obj["prompt"], obj["completion"], where)
    if "messages" in obj:
        return _chat_example(obj["messages"], where, tokenizer)
    raise DataError(f"{where}: keys {sorted(obj)}, {shapes}")


def _chat_example(messages, where: str, tokenizer) -> Example:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    unknown = next((m["role"] for m in messages if m["role"] not in CHAT_ROLES), None)
    if unknown is not None:
        raise DataError(
            f"{where}: role {unknown!r} is not one of {', '.join(CHAT_ROLES)}; rename it (chat templates "
            "drop or mangle roles they do not know)"
        )
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must have role 'assistant' (it is what the model learns)")
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        # Without a template, render a plain transcript.
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
        return Example(prompt, messages[-1]["content"], where)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):  # templates that rewrite history: fall back to the suffix
        return Example(prompt, messages[-1]["content"], where)
    return Example(prompt, full[len(prompt) :], where)


# --- the built-in corpus -----------------------------------------------------------


@dataclass(frozen=True)
class CorpusSplit:
    shards: list[list[Example]]  # one list per data owner, disjoint topics
    heldout: list[Example]  # topics no shard has: the model owner's evaluation set


def python_reference_split(n_shards: int, heldout_every: int = 5) -> CorpusSplit:
    """Split the Python reference by topic: every `heldout_every`-th topic (sorted) is held
    out; the rest go to `n_shards` contiguous alphabetical ranges, so each data owner sees
    different subject matter (non-IID), deterministically."""
    from pydoc_data.topics import topics

    if n_shards < 1:
        raise DataError("the number of shards must be at least 1")
    names = sorted(topics)
    heldout_names = names[::heldout_every] if heldout_every else []
    train_names = [n for n in names if n not in set(heldout_names)]
    if n_shards > len(train_names):
        raise DataError(f"{PYTHON_REFERENCE} has {len(train_names)} training topics; ask for at most that many shards")
    shards: list[list[Example]] = []
    for i in range(n_shards):
        lo, hi = i * len(train_names) // n_shards, (i + 1) * len(train_names) // n_shards
        shards.append([Example("", topics[n], f"{PYTHON_REFERENCE}:{n}") for n in train_names[lo:hi]])
    heldout = [Example("", topics[n], f"{PYTHON_REFERENCE}:{n}") for n in heldout_names]
    return CorpusSplit(shards=shards, heldout=heldout)


# --- tokenizing --------------------------------------------------------------------


@dataclass
class TokenBlocks:
    """Fixed-length training blocks: ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: torch.Tensor  # (n, block_size) long
    labels: torch.Tensor  # (n, block_size) long
    attention_mask: torch.Tensor  # (n, block_size) long

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def batches(self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True):
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size]
            yield self.input_ids[idx], self.labels[idx], self.attention_mask[idx]


def tokenize_examples(examples: list[Example], tokenizer, block_size: int = 256) -> TokenBlocks:
    """Tokenize examples into blocks of `block_size` tokens.

    Plain-text examples are concatenated (separated by EOS) and cut into full blocks, as
    in language-model pre-training. Prompt/completion examples become one block each
    (truncated from the left of the prompt if too long, padded on the right), with the
    loss on completion tokens only.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stream: list[int] = []
    rows_ids, rows_labels, rows_mask = [], [], []
    for ex in examples:
        if not ex.prompt:
            stream.extend(tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [eos])
            continue
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [eos]
        c = c[:block_size]
        p = p[max(0, len(p) - (block_size - len(c))) :]
        ids = p + c
        labels = [IGNORE_INDEX] * len(p) + c
        n_pad = block_size - len(ids)
        rows_ids.append(ids + [pad] * n_pad)
        rows_labels.append(labels + [IGNORE_INDEX] * n_pad)
        rows_mask.append([1] * len(ids) + [0] * n_pad)
    for i in range(0, len(stream) - block_size + 1, block_size):
        chunk = stream[i : i + block_size]
        rows_ids.append(chunk)
        rows_labels.append(chunk)
        rows_mask.append([1] * block_size)
    if not rows_ids:
        raise DataError(
            f"the data holds {len(stream)} tokens of text, fewer than one block of {block_size}; "
            "add data or lower the block size"
        )
    return TokenBlocks(
        input_ids=torch.tensor(rows_ids, dtype=torch.long),
        labels=torch.tensor(rows_labels, dtype=torch.long),
        attention_mask=torch.tensor(rows_mask, dtype=torch.long),
    )
