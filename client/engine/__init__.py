"""The data owner's sparse-update training engine (Tiny Training / PockEngine ideas).

Public API:
- ``TrainConfig``, ``TrainResult`` (config.py)
- ``train_adapter(bundle, examples, cfg, progress=True, initial_adapter=None)``: train a
  loaded bundle's adapter; returns the FULL adapter keyed by original names + metrics.
- ``train_model(EngineTarget(...), examples, cfg)``: the same on any model (e.g. a full
  model with chosen trainable blocks), used by the benchmark.
- ``parse_scheme`` / ``SchemeError`` (schemes.py), ``BudgetError`` (budget.py).
"""

from .checkpoint import CheckpointError
from .config import TrainConfig, TrainResult
from .budget import BudgetError, parse_memory
from .schemes import SchemeError, parse_scheme
from .trainer import EngineError, EngineTarget, export_adapter, train_adapter, train_model

__all__ = [
    "BudgetError",
    "CheckpointError",
    "EngineError",
    "EngineTarget",
    "SchemeError",
    "TrainConfig",
    "TrainResult",
    "export_adapter",
    "parse_memory",
    "parse_scheme",
    "train_adapter",
    "train_model",
]
