"""Shared pieces of the quality benchmarks: the data protocol, a minimal block trainer,
held-out perplexity and plug-in by name.

The protocol is the one REFERENCES.md measured on the default model: python-reference,
held-out topics (every 5th), 256-token blocks, batch 4, AdamW, 2 threads. The trainer
here is deliberately small (train the parameters of chosen blocks, everything else
frozen) so the benchmark does not depend on the client engine's schedulers.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from offsite.emulators.data import TokenBlocks, perplexity, python_reference_split, tokenize_examples
from offsite.emulators.losses import causal_lm_nll
from offsite.emulators.models import LoadedModel


@dataclass(frozen=True)
class Protocol:
    block_size: int = 256
    batch_size: int = 4
    steps: int = 60
    lr: float = 1e-4
    full_lr: float = 1e-4
    seed: int = 0
    adapter_layers: tuple[int, int] = (2, 2)


def set_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_blocks(loaded: LoadedModel, block_size: int = 256) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, held-out) blocks of python-reference: held-out topics are never trained on."""
    split = python_reference_split(n_shards=1)
    train = tokenize_examples(split.shards[0], loaded.tokenizer, block_size)
    heldout = tokenize_examples(split.heldout, loaded.tokenizer, block_size)
    return train, heldout


def adapter_block_indices(n_layers: int, adapter_layers: tuple[int, int] = (2, 2)) -> list[int]:
    a, b = adapter_layers
    return list(range(a)) + list(range(n_layers - b, n_layers))


def block_params(model, family, positions: list[int]) -> dict[str, torch.nn.Parameter]:
    prefixes = tuple(family.block_prefix(i) for i in positions)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


def train_blocks(
    model,
    family,
    positions: list[int] | None,
    train: TokenBlocks,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
    warmup_steps: int = 0,
    progress: str | None = None,
) -> dict:
    """Train the parameters of the blocks at `positions` (all parameters if None) with AdamW.

    Everything else is frozen (requires_grad False), so AdamW state exists only for the
    trained blocks. Returns {"losses": [...], "seconds": s, "s_per_step": s}.
    """
    params = dict(model.named_parameters()) if positions is None else block_params(model, family, positions)
    return train_parameters(model, params, train, steps, lr, batch_size, seed, warmup_steps, progress)


def train_parameters(
    model,
    params: dict[str, torch.nn.Parameter],
    train: TokenBlocks,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
    warmup_steps: int = 0,
    progress: str | None = None,
) -> dict:
    """AdamW on `params`, everything else frozen; the batch order depends only on `seed`
    (so every row and every data owner of a bench sees the same data)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    batches = iter(())
    for step in range(steps):
        try:
            ids, labels, mask = next(batches)
        except StopIteration:
            batches = train.batches(batch_size, generator=gen, shuffle=True)
            ids, labels, mask = next(batches)
        nll, n = causal_lm_nll(model, ids, labels, mask)
        loss = nll / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and (step % 10 == 0 or step == steps - 1):
            print(
                f"[{progress}] step {step + 1}/{steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    return {"losses": losses, "seconds": seconds, "s_per_step": seconds / max(steps, 1)}


def heldout_ppl(model, heldout: TokenBlocks) -> float:
    model.eval()
    return perplexity(model, heldout, batch_size=4)


def blocks_state_by_original(model, family, positions: list[int], origin: list[int]) -> dict[str, torch.Tensor]:
    """Parameters of the blocks at emulator `positions`, renamed to the original block index."""
    out = {}
    for n, p in block_params(model, family, positions).items():
        out[family.rename_block(n, origin[family.block_index(n)])] = p.detach().clone()
    return out


@torch.no_grad()
def plug_state(model, state_by_original: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state into the full model by parameter name (never by position)."""
    params = dict(model.named_parameters())
    missing = [n for n in state_by_original if n not in params]
    if missing:
        raise KeyError(f"adapter names not in the model: {missing[:3]}")
    for n, t in state_by_original.items():
        params[n].copy_(t)


def log_gain_share(zero_shot: float, ceiling: float, value: float) -> float:
    """Share of the ceiling's log-perplexity gain over zero-shot that `value` reaches."""
    return (math.log(zero_shot) - math.log(value)) / (math.log(zero_shot) - math.log(ceiling))
