"""The model owner's measure of a round: plug-in perplexity on its own held-out set.

The aggregated adapter is put into the full base model by parameter name (plug-in) and
scored on held-out text that no data owner trained on. The base model is loaded once per
job; the adapter blocks' original weights are restored after each measurement, so one
copy of the model serves every round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from offsite.emulators.data import (
    PYTHON_REFERENCE,
    load_examples,
    perplexity,
    python_reference_split,
    tokenize_examples,
)
from offsite.emulators.models import LoadedModel, load_model


def heldout_examples(spec: str):
    """The model owner's held-out examples: the built-in corpus's held-out topics, or a file/dir."""
    if spec == PYTHON_REFERENCE:
        return python_reference_split(n_shards=1).heldout
    return load_examples(Path(spec))


class PluginEvaluator:
    def __init__(
        self, model: str | LoadedModel, heldout: str = PYTHON_REFERENCE, block_size: int = 256, limit: int = 0
    ):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        blocks = tokenize_examples(heldout_examples(heldout), self.loaded.tokenizer, block_size)
        if limit and len(blocks) > limit:
            blocks.input_ids, blocks.labels, blocks.attention_mask = (
                blocks.input_ids[:limit],
                blocks.labels[:limit],
                blocks.attention_mask[:limit],
            )
        self.blocks = blocks

    @property
    def base_digest(self) -> str:
        return self.loaded.digest

    @torch.no_grad()
    def plugin_perplexity(self, adapter: dict[str, np.ndarray]) -> float:
        params = dict(self.loaded.model.named_parameters())
        unknown = sorted(set(adapter) - set(params))
        if unknown:
            raise KeyError(
                f"the adapter has tensors the base model lacks: {unknown[:3]}; was it built for {self.loaded.model_id}?"
            )
        saved = {k: params[k].detach().clone() for k in adapter}
        try:
            for k, v in adapter.items():
                params[k].copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)).view_as(params[k]))
            return perplexity(self.loaded.model, self.blocks)
        finally:
            for k, v in saved.items():
                params[k].copy_(v)
