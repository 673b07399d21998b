"""Layer sharing instead of dropping (after CRaSh, EMNLP 2023): fewer distinct middle blocks,
depth unchanged.

Dropping middle blocks shortens the emulator, and the adapter then learns around the
missing depth. CRaSh keeps the depth: adjacent middle blocks whose representations are
alike are clustered, one block per cluster is kept, and it is repeated in the other slots
of its cluster. The emulator computes through as many blocks as the full model, but holds
only `unique` distinct ones; what the other blocks knew is not in the bundle, so a data
owner who fine-tunes every weight has to relearn it rather than repair a rounding error.

How: every middle block's output on a few support batches (the model owner's corpus) is
compared with every other's by linear CKA (Kornblith et al. 2019); the middle is cut into
`unique` contiguous clusters by repeatedly merging the adjacent pair of clusters with the
highest average similarity; each cluster keeps its medoid (the block most similar to the
rest of its cluster). `share_map` returns slot -> source position for the repeated slots.
`apply_sharing` copies each source block's stored tensors into its slots, so it runs after
quantization (the copies are then bit-identical and a bundle stores each source once).
"""

from __future__ import annotations

import torch

from .data import TokenBlocks
from .families import Family
from .split import SplitPlan


class ShareError(ValueError):
    """A sharing option that cannot work; the message names it and the fix."""


@torch.no_grad()
def block_outputs(
    model, family: Family, positions: list[int], support: TokenBlocks, n_batches: int = 4, max_tokens: int = 2048
) -> dict[int, torch.Tensor]:
    """Block position -> its output hidden states at the support's real tokens, [tokens, hidden]."""
    blocks = family.get_blocks(model)
    outs: dict[int, list[torch.Tensor]] = {p: [] for p in positions}
    current: dict = {}

    def hook_for(pos):
        def hook(_m, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            outs[pos].append(h[current["mask"]].float())

        return hook

    handles = [blocks[p].register_forward_hook(hook_for(p)) for p in positions]
    try:
        model.eval()
        gen = torch.Generator().manual_seed(0)
        for i, (ids, _labels, mask) in enumerate(support.batches(2, generator=gen, shuffle=True)):
            if i >= n_batches:
                break
            current["mask"] = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for p, hs in outs.items():
        if not hs:
            raise ShareError("the support data gave no batches: give the build a corpus with at least one block")
        x = torch.cat(hs)
        out[p] = x[:: max(1, len(x) // max_tokens)][:max_tokens]
    return out


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [tokens, features] representations (1.0: the same up to rotation and scale)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    xy = (x.T @ y).pow(2).sum()
    denom = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(xy / denom.clamp(min=1e-12))


def similarity(outputs: dict[int, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """(positions in order, their pairwise linear-CKA matrix)."""
    pos = sorted(outputs)
    n = len(pos)
    sim = torch.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = linear_cka(outputs[pos[i]], outputs[pos[j]])
    return pos, sim


def contiguous_clusters(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Cut indices 0..n-1 into `k` runs by merging, each time, the adjacent pair of runs with
    the highest average pairwise similarity (average linkage restricted to neighbours)."""
    n = sim.shape[0]
    if not 1 <= k <= n:
        raise ShareError(f"cannot keep {k} unique blocks of {n} middle blocks: choose 1..{n}")
    runs = [[i] for i in range(n)]
    while len(runs) > k:
        link = [float(sim[runs[i]][:, runs[i + 1]].mean()) for i in range(len(runs) - 1)]
        i = max(range(len(link)), key=lambda j: link[j])
        runs[i : i + 2] = [runs[i] + runs[i + 1]]
    return runs


def medoid(run: list[int], sim: torch.Tensor) -> int:
    """The member most similar on average to its run (the first on ties)."""
    return max(run, key=lambda i: (float(sim[i, run].sum()), -i))


def share_map(
    model, family: Family, plan: SplitPlan, support: TokenBlocks, unique: int, n_batches: int = 4
) -> dict[int, int]:
    """Emulator slot -> the emulator position of the block it repeats, for every middle slot
    that is not its cluster's kept block (`unique` kept blocks in all)."""
    positions = plan.emulator_positions
    if not 1 <= unique <= len(positions):
        raise ShareError(
            f"--share {unique}: the emulator has {len(positions)} middle blocks; keep between 1 and {len(positions)} unique"
        )
    if unique == len(positions):
        return {}
    pos, sim = similarity(block_outputs(model, family, positions, support, n_batches))
    out = {}
    for run in contiguous_clusters(sim, unique):
        keep = medoid(run, sim)
        out.update({pos[i]: pos[keep] for i in run if i != keep})
    return out


@torch.no_grad()
def apply_sharing(model, family: Family, sources: dict[int, int]) -> None:
    """Copy each source block's parameters and buffers into its slots (in place; the slot
    modules stay, so attention layer indices and hooks are untouched). Sources and slots
    must be stored alike (same bits and group size), or the copy would change the format."""
    blocks = family.get_blocks(model)
    for slot, src in sorted(sources.items()):
        if sources.get(src, src) != src:
            raise ShareError(f"block {slot} repeats block {src}, which itself repeats another: give the kept block")
        want, have = blocks[src].state_dict(), blocks[slot].state_dict()
        bad = [n for n in want if n not in have or have[n].shape != want[n].shape or have[n].dtype != want[n].dtype]
        if bad or set(have) != set(want):
            raise ShareError(
                f"block {slot} cannot repeat block {src}: they are stored differently ({(bad or sorted(set(have) ^ set(want)))[0]}); "
                "share blocks of the same precision (use one --quantize for the middle)"
            )
        for n, t in have.items():
            t.copy_(want[n])


def repeated_bytes(model, family: Family, sources: dict[int, int]) -> int:
    """Bytes the repeated slots would cost if stored again (what storing each source once saves)."""
    blocks = family.get_blocks(model)
    return sum(t.numel() * t.element_size() for slot in sources for t in blocks[slot].state_dict().values())
