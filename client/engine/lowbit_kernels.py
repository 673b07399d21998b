"""Which kernel runs each frozen low-bit layer in a training run, and what it costs.

The int8 kernel (quant_forward.py) is the fast one, and it replaces the packed codes it is
built from (`adopt_int8`), so it costs its cache minus the codes: on the shipped emulator
(SmolLM2-135M, 26 int4-AWQ middle blocks with 10% of MLP channels pruned) 82 MB of int8
rows in place of 52 MB of codes, after the pruned channels are dropped. It runs everywhere
when asked (`lowbit_kernel="int8"`), with no budget, and with the "auto" budget, which is
measured after it and so always holds it; under a budget in MB the scheme is chosen first
(rebuild kernel) and the int8 weights take whatever room the budget leaves (`widen`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import TrainConfig
from .memory import MB
from .quant_forward import (
    drop_dead_mlp_channels,
    install_fast_forward,
    int8_available,
    int8_cache_bytes,
    int8_net_bytes,
    int8_of,
    quant_linears,
)


@dataclass
class LowbitKernels:
    model: nn.Module
    dtype: torch.dtype
    layers: list[nn.Module]
    int8_possible: bool  # int8 may run here: available, not ruled out by the config
    undo: Callable[[], None]
    dropped_channels: int = 0

    @property
    def int8_layers(self) -> int:
        return sum(int8_of(m) is not None for m in self.layers)

    @property
    def all_int8(self) -> bool:
        return bool(self.layers) and self.int8_layers == len(self.layers)

    @property
    def int8_cache_mb(self) -> float:
        return sum(int8_cache_bytes(m) for m in self.layers if int8_of(m) is not None) / MB

    def sequences_per_pass(self, cfg: TrainConfig) -> int | None:
        """The step's sequences per pass: the whole micro-batch while any layer rebuilds its weight,
        since the rebuild runs once per pass (the shipped emulator with the rebuild kernel, one
        sequence per pass: 3.9 CPU-s a step against 2.8 whole-batch)."""
        return cfg.sequences_per_pass if self.int8_layers == len(self.layers) else None

    def widen(self, room_bytes: float) -> None:
        """Move layers (model order) to the int8 kernel while their net cost fits `room_bytes`."""
        if not self.int8_possible or self.all_int8:
            return
        n = 0
        for layer in self.layers:
            room_bytes -= int8_net_bytes(layer)
            if room_bytes < 0:
                break
            n += 1
        if n > self.int8_layers:
            self.undo()
            self.undo = install_fast_forward(self.model, self.dtype, n, replace=True)
            self.dropped_channels += drop_dead_mlp_channels(self.model)


def install_lowbit_kernels(model: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> LowbitKernels:
    """Give the model's low-bit layers their kernels before the budget reads memory."""
    layers = quant_linears(model)
    possible = bool(layers) and int8_available() and cfg.lowbit_kernel != "dequant"
    everywhere = possible and (cfg.lowbit_kernel == "int8" or cfg.memory_budget_mb in (None, "auto"))
    undo = install_fast_forward(model, dtype, len(layers) if everywhere else 0, replace=True)
    return LowbitKernels(
        model, dtype, layers, possible and cfg.lowbit_kernel == "auto", undo, drop_dead_mlp_channels(model)
    )
