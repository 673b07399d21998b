"""Causal-LM loss computed in chunks, so the vocabulary never materialises for a batch,
and the one evaluation loop over it (`mean_nll`, `perplexity`).

SmolLM2 has a 49,152-token vocabulary: full fp32 logits for 4 x 256 tokens are 192 MiB,
plus as much again for their gradient. Running the LM head over a few hundred tokens at a
time keeps that to a few MiB; with autograd, `torch.utils.checkpoint` recomputes each
chunk's logits in backward instead of keeping them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label value that the loss skips (F.cross_entropy's ignore_index)
CHUNK_TOKENS = 512


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final hidden states (after the final norm), without the LM head."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def _chunk_nll(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a label (shifted by one) and those labels, flattened."""
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


def lm_nll_from_hidden(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over label tokens != IGNORE_INDEX, and their count."""
    h, y = loss_positions(hidden, labels)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_tokens):
        hc, yc = h[i : i + chunk_tokens], y[i : i + chunk_tokens]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_nll, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, hc, yc)
    return total, n


def causal_lm_nll(model, input_ids, labels, attention_mask=None, chunk_tokens: int = CHUNK_TOKENS):
    """Sum of next-token NLL of `model` on a batch, and the number of loss tokens."""
    hidden = hidden_states(model, input_ids, attention_mask)
    return lm_nll_from_hidden(model.get_output_embeddings(), hidden, labels, chunk_tokens)


@torch.no_grad()
def mean_nll(
    model,
    blocks,
    batch_size: int = 4,
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> float:
    """Mean next-token NLL over the loss tokens of `blocks` (`data.TokenBlocks`), in order,
    over at most `max_batches` batches, each run inside `context()` (e.g. autocast)."""
    total, count = 0.0, 0
    for i, (ids, labels, mask) in enumerate(blocks.batches(batch_size, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        if device is not None:
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with context():
            nll_sum, n = causal_lm_nll(model, ids, labels, mask, chunk_tokens)
        total += float(nll_sum)
        count += n
    return total / max(count, 1)


def perplexity(model, blocks, batch_size: int = 4, **kwargs) -> float:
    """exp(mean token NLL) over the loss tokens of `blocks`; options as `mean_nll`."""
    return math.exp(mean_nll(model, blocks, batch_size, **kwargs))
