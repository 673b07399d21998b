"""Losses of several targets after one shared context, with the context computed once.

The bias suites score three answers after the same ~100-token prompt, and canary exposure
scores 32 six-digit secrets after the same prefix: run as separate rows, each row
recomputes the whole context, so ~2/3 (bias) to ~3/4 (canaries) of that model work is
repeated. Here the context runs once (batch 1, with the KV cache on), the cache is repeated
for the k targets, and the targets run as one right-padded batch on top of it. The first
target token is predicted by the context's last position, the rest by the target batch.
Same model, same tokens, same positions: the NLLs equal the separate-row ones up to float
rounding (``tests/test_prefix_losses.py`` checks this against ``Worker._loss_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def shared_context_nll(model, context: list[int], targets: list[list[int]], pad_id: int) -> list[dict]:
    """Summed next-token NLL of each target (token ids) given `context` (token ids, non-empty).

    Returns one {"nll", "tokens"} per target, in order. Targets may be empty (nll 0)."""
    if not context:
        raise ValueError("shared_context_nll needs a non-empty context; plain text goes through the row path")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    ctx = torch.tensor([context], device=device)
    out = model.base_model(input_ids=ctx, attention_mask=torch.ones_like(ctx), use_cache=True)
    first_logits = head(out.last_hidden_state[:, -1]).float()[0]  # predicts every target's first token
    first_logp = F.log_softmax(first_logits, dim=-1)
    k, width = len(targets), max((len(t) for t in targets), default=0)
    results = [{"nll": 0.0, "tokens": len(t)} for t in targets]
    if width == 0:
        return results
    for r, t in enumerate(targets):
        if t:
            results[r]["nll"] = float(-first_logp[t[0]])
    if width == 1:
        return results
    # The rest of each target on top of the repeated cache; right padding never affects the
    # real tokens before it (causal attention), and the padded positions are not scored.
    cache = out.cache
    cache.batch_repeat_interleave(k)
    ids = torch.full((k, width - 1), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((k, len(context) + width - 1), dtype=torch.long, device=device)
    mask[:, : len(context)] = 1
    for r, t in enumerate(targets):
        if len(t) > 1:
            ids[r, : len(t) - 1] = torch.tensor(t[:-1], device=device)
            mask[r, len(context) : len(context) + len(t) - 1] = 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    hidden = hidden.last_hidden_state  # [k, width-1, d]; position j predicts target token j+1
    for r, t in enumerate(targets):
        if len(t) > 1:
            logits = head(hidden[r, : len(t) - 1]).float()
            results[r]["nll"] += float(F.cross_entropy(logits, torch.tensor(t[1:], device=device), reduction="sum"))
    return results
