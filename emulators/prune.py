"""Gradient-scored MLP channel pruning of the emulator's middle (after GradOT's channel step).

Quantization error is something a data owner who fine-tunes every weight can repair
(measured: a fully fine-tuned 3-bit emulator beats the product on the owner's own domain).
Removed channels are different: a pruned MLP channel j has its gate row, up row and down
column all zero, so its activation silu(0) * 0 = 0, and the gradients of those three
slices are zero as well (each is a product with a zero factor). Gradient descent (SGD or
Adam, without weight decay tricks) cannot bring the channel back: it is a fixed point.
The information it held is gone from the bundle, whatever the owner trains.

Which channels: each middle block's intermediate channels are scored on a few support
batches by the Fisher/Taylor term E[(a_j * dL/da_j)^2] (how much removing the channel would
change the per-token loss, and so the gradient that flows through the block to the
adapter), and the lowest-scored `fraction` of each block is zeroed. Shapes are unchanged,
so the bundle format, AWQ and low-bit storage need nothing new; prune before quantizing
(zero is exactly representable in the asymmetric grid, so pruned slices stay zero).
"""

from __future__ import annotations

import torch

from .data import TokenBlocks
from .families import Family
from .losses import causal_lm_nll
from .split import SplitPlan


class PruneError(ValueError):
    """A pruning option or model that cannot work; the message says which and the fix."""


def _mlp(block) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]:
    mlp = getattr(block, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise PruneError(
            "channel pruning needs gated MLPs (gate_proj/up_proj/down_proj: llama, qwen2, mistral); "
            "this family has none"
        )
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def channel_scores(
    model, family: Family, positions: list[int], support: TokenBlocks, n_batches: int = 4, batch_size: int = 2
) -> dict[int, torch.Tensor]:
    """Block position -> per-intermediate-channel score E[(a * dL/da)^2] over `n_batches`."""
    blocks = family.get_blocks(model)
    scores: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(pos):
        def hook(_m, inputs):
            a = inputs[0]
            if a.requires_grad:
                a.register_hook(lambda g, a=a.detach(): _accumulate(pos, a, g))

        return hook

    def _accumulate(pos, a, g):
        s = (a * g).float().pow(2).reshape(-1, a.shape[-1]).sum(0)
        scores[pos] = scores.get(pos, 0) + s

    for pos in positions:
        handles.append(_mlp(blocks[pos])[2].register_forward_pre_hook(hook_for(pos)))
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        # gradients w.r.t. activations only: let the embeddings' output require grad
        emb = model.get_input_embeddings()
        h = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        handles.append(h)
        model.eval()
        gen = torch.Generator().manual_seed(0)
        for i, (ids, labels, mask) in enumerate(support.batches(batch_size, generator=gen, shuffle=True)):
            if i >= n_batches:
                break
            nll, n = causal_lm_nll(model, ids, labels, mask)
            (nll / max(n, 1)).backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    missing = [p for p in positions if p not in scores]
    if missing:
        raise PruneError(f"no activation gradients reached blocks {missing}; the support data has no loss tokens")
    return scores


@torch.no_grad()
def prune_channels(model, family: Family, scores: dict[int, torch.Tensor], fraction: float) -> dict[int, list[int]]:
    """Zero the lowest-scored `fraction` of each scored block's MLP channels (gate and up
    rows, down column). Returns block position -> pruned channel indices."""
    if not 0.0 <= fraction < 1.0:
        raise PruneError(f"prune fraction {fraction} must be in [0, 1) (e.g. 0.25 removes a quarter of the channels)")
    blocks = family.get_blocks(model)
    pruned = {}
    for pos, s in sorted(scores.items()):
        gate, up, down = _mlp(blocks[pos])
        k = int(round(fraction * s.numel()))
        idx = torch.argsort(s)[:k]
        gate.weight[idx, :] = 0
        up.weight[idx, :] = 0
        down.weight[:, idx] = 0
        for lin in (gate, up):
            if lin.bias is not None:
                lin.bias[idx] = 0
        pruned[pos] = sorted(int(i) for i in idx)
    return pruned


def prune_emulator(
    model, family: Family, plan: SplitPlan, support: TokenBlocks, fraction: float, n_batches: int = 4
) -> dict[int, list[int]]:
    """Score and prune every middle block of the emulator in place (before quantizing)."""
    if fraction == 0:
        return {}
    scores = channel_scores(model, family, plan.emulator_positions, support, n_batches)
    return prune_channels(model, family, scores, fraction)
