"""Architecture families: where each kind of causal LM keeps its blocks.

Offsite-Tuning needs to know, for a model, which module list holds the transformer
blocks, which modules are the embeddings, the final norm and the LM head, and how the
config says how many blocks there are. Everything else (split, plug-in, the engine)
asks this registry instead of hard-coding attribute paths. Adding a family is one
`Family(...)` entry in `FAMILIES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:  # annotations only: importing transformers costs a data owner's process ~20 MB of RSS
    from transformers import PretrainedConfig


class UnknownFamilyError(ValueError):
    """The model's architecture is not in the family registry."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # values of `config.model_type` this family covers
    blocks: str  # dotted path of the ModuleList of transformer blocks
    embeddings: tuple[str, ...]  # dotted paths of embedding modules (token, position)
    final_norm: str  # dotted path of the norm after the last block
    lm_head: str  # dotted path of the output projection
    num_layers_attr: str  # config attribute holding the number of blocks
    extra_frozen: tuple[str, ...] = ()  # other non-block modules (e.g. OPT's project_in/out)

    def block_prefix(self, index: int) -> str:
        """Parameter-name prefix of block `index`, e.g. ``model.layers.3.``."""
        return f"{self.blocks}.{index}."

    def block_index(self, param_name: str) -> int | None:
        """The block a parameter belongs to, or None for embeddings/norm/head."""
        prefix = self.blocks + "."
        if not param_name.startswith(prefix):
            return None
        head = param_name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def rename_block(self, param_name: str, new_index: int) -> str:
        """``model.layers.7.mlp.up_proj.weight`` -> ``model.layers.{new_index}.mlp.up_proj.weight``."""
        index = self.block_index(param_name)
        if index is None:
            raise ValueError(f"{param_name!r} is not a parameter of a block of family {self.name}")
        rest = param_name[len(self.block_prefix(index)) :]
        return self.block_prefix(new_index) + rest

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_layers_attr))

    def with_num_layers(self, config: PretrainedConfig, n: int, keep: list[int] | None = None) -> PretrainedConfig:
        """A copy of `config` with `n` blocks; per-layer lists (e.g. `layer_types`) follow `keep`."""
        new = copy.deepcopy(config)
        setattr(new, self.num_layers_attr, n)
        layer_types = getattr(new, "layer_types", None)
        if isinstance(layer_types, list) and keep is not None:
            new.layer_types = [layer_types[i] for i in keep]
        return new

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        lm_head="lm_head",
        num_layers_attr="num_hidden_layers",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        num_layers_attr="n_layer",
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        num_layers_attr="num_hidden_layers",
        extra_frozen=("model.decoder.project_in", "model.decoder.project_out"),
    ),
)


def family_for(config_or_model: PretrainedConfig | nn.Module) -> Family:
    """The family of a model or config; a clear error names the supported ones."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnknownFamilyError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(supported)}. "
        "Add a Family entry in offsite/emulators/families.py to support it."
    )


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnknownFamilyError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
