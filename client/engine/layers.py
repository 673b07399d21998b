"""Trainable add-ons that wrap frozen layers: the sliced input-channel delta.

Tiny Training updates only a fraction of a weight's input channels. Masking the full
weight's gradient would still allocate a full-size gradient and optimizer state and keep
the whole input for backward; a frozen W plus a trainable delta on gathered columns
keeps all three at the size of the slice. `index_select` copies, so autograd saves only
the selected columns, not a view of the whole input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D, recognised without importing transformers (~20 MB of RSS)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def input_features(module: nn.Module) -> int:
    # Conv1D (GPT-2) stores its weight as (in, out), nn.Linear as (out, in).
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def output_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def input_channel_norms(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().float()
    return w.norm(dim=1) if is_conv1d(module) else w.norm(dim=0)


class ChannelDelta(nn.Module):
    """y = base(x) + x[..., idx] @ delta^T, with base frozen and delta (out, k) trainable."""

    def __init__(self, base: nn.Module, idx: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("idx", idx.to(torch.long), persistent=True)
        self.delta = nn.Parameter(torch.zeros(output_features(base), idx.numel(), dtype=base.weight.dtype))

    @classmethod
    def top_channels(cls, base: nn.Module, fraction: float) -> ChannelDelta:
        """Pick the `fraction` of input channels with the largest weight norm (Tiny Training)."""
        n = input_features(base)
        k = max(1, min(n, round(fraction * n)))
        idx = torch.topk(input_channel_norms(base), k).indices.sort().values
        return cls(base, idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(x.index_select(-1, self.idx), self.delta)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Add the delta into the base weight's columns and return the plain base layer."""
        w = self.base.weight
        d = self.delta.detach().to(w.dtype)
        if is_conv1d(self.base):
            w.index_add_(0, self.idx, d.t())
        else:
            w.index_add_(1, self.idx, d)
        return self.base
