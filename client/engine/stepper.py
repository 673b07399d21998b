"""One training step's machinery, shared by the training loop and the budget's probes.

`Stepper` runs forward + chunked loss + backward of micro-batches with the frozen prefix
pruned; `make_optimizer` builds the engine's own optimizer for a parameter list. Both the
loop (trainer.py) and contribution analysis (budget.py) use them, so neither imports the
other.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from offsite.emulators.data import IGNORE_INDEX
from offsite.emulators.families import Family
from offsite.emulators.losses import hidden_states, lm_nll_from_hidden

from . import optim
from .config import TrainConfig
from .headloss import frozen_head_nll
from .pruning import autocast, pruned_backward
from .quant_forward import int8_available
from .schemes import AppliedScheme


class EngineError(ValueError):
    """The run cannot start as configured; the message says what to change."""


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> optim.Optimizer:
    if cfg.optimizer == "adamw":
        return optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise EngineError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")


class Stepper:
    """Forward + chunked loss + backward of one micro-batch, with the prefix pruned."""

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        applied: AppliedScheme,
        cfg: TrainConfig,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model, self.family, self.cfg = model, family, cfg
        self.device, self.dtype = device, dtype
        self.lowest = applied.lowest_block
        self.head = model.get_output_embeddings()
        self.fused_head = (
            cfg.fused_head_loss and getattr(self.head, "bias", None) is None and not self.head.weight.requires_grad
        )
        # the head's training logits in int8 whenever the middle may run int8 ("dequant" asks for
        # the exact forward everywhere); held-out evaluation always reads the exact logits
        self.int8_logits = cfg.lowbit_kernel != "dequant" and int8_available()

    def loss_sum(self, ids, labels, mask) -> tuple[torch.Tensor, int]:
        ids, labels, mask = ids.to(self.device), labels.to(self.device), mask.to(self.device)
        with autocast(self.device, self.dtype):
            with (
                pruned_backward(self.model, self.family, self.lowest, self.cfg.activation_checkpointing),
                torch.no_grad(),
            ):
                hidden = hidden_states(self.model, ids, mask)
            if self.fused_head:
                return frozen_head_nll(
                    self.head, hidden, labels, self.cfg.loss_chunk_tokens, self.dtype, self.int8_logits
                )
            return lm_nll_from_hidden(self.head, hidden, labels, self.cfg.loss_chunk_tokens)

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Accumulate gradients over `batches`, normalised per loss token of the whole step."""
        total = sum(int((lab[:, 1:] != IGNORE_INDEX).sum()) for _, lab, _ in batches)
        loss_total = 0.0
        for ids, labels, mask in batches:
            rows = self.cfg.sequences_per_pass or ids.shape[0]
            for r in range(0, ids.shape[0], rows):
                nll, n = self.loss_sum(ids[r : r + rows], labels[r : r + rows], mask[r : r + rows])
                if n:
                    (nll / max(total, 1)).backward()
                loss_total += float(nll.detach())
        return loss_total / max(total, 1), total
