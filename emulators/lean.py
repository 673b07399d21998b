"""A transformers-free runtime for Llama-style emulators: what a data owner's process loads.

Why it exists: importing transformers' model classes (and its tokenizer classes) pulls in
torch.distributed.tensor, torch._dynamo, sympy and scipy; on this kind of machine that is
~140 MB of resident memory before a single weight is loaded, a third of a sparse client's
whole training footprint. Training an adapter needs none of it: a Llama block is an RMSNorm,
rotary attention and a SwiGLU MLP. This module is that forward pass (read it top to bottom,
nanoGPT-style) plus the tokenizer from the `tokenizers` library and the chat template
rendered with jinja2, both read from the files the bundle ships.

Module and parameter names are exactly transformers' (`model.layers.3.self_attn.q_proj.weight`),
so the family registry, the adapter format, the engine's schemes and plug-in work unchanged,
and `tests/test_lean.py` checks that logits match `LlamaForCausalLM` on the same weights.
Only plain Llama configs qualify (`supports`); anything else loads through transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LeanConfig:
    """The fields of a transformers `LlamaConfig` that the forward pass reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    use_cache: bool = False  # read and set by callers written for transformers models

    @classmethod
    def from_dict(cls, d: dict) -> LeanConfig:
        rope = d.get("rope_parameters") or {"rope_theta": d.get("rope_theta", 10000.0)}
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope["rope_theta"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def supports(config: dict) -> str | None:
    """None if this runtime computes exactly what transformers does for `config`, else why not."""
    if config.get("model_type") != "llama":
        return f"model_type {config.get('model_type')!r} (the lean runtime covers plain Llama)"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r}"
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        return "scaled rotary embeddings"
    if config.get("pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


# --- the model ------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the variance in fp32 whatever the compute dtype, as transformers does
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotary_tables(cfg: LeanConfig, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions 0..length-1, shape (length, head_dim)."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=device) / cfg.head_dim)
    )
    angles = torch.arange(length, device=device, dtype=torch.float)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.cfg = cfg
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # grouped-query attention: each key/value head serves several query heads; enable_gqa
        # reads them in place of a repeated copy (shipped emulator: ~0.05 CPU-s a training step)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(padding_mask: torch.Tensor | None, length: int, device) -> torch.Tensor | None:
    """None (plain causal) when nothing is padded, else a boolean (batch, 1, t, t) mask.

    A query always sees itself, so a fully padded row (left padding) stays finite; its
    output is never scored."""
    if padding_mask is None or bool(padding_mask.all()):
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = causal[None, None] & padding_mask.bool()[:, None, None, :]
    return mask | torch.eye(length, dtype=torch.bool, device=device)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.cfg = cfg
        # Weights always come from a bundle: skip the random init (on the meta device,
        # Embedding's normal_ would import torch._dynamo, 100+ MB, for nothing).
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_ignored
    ) -> SimpleNamespace:
        x = self.embed_tokens(input_ids)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.float()  # a bf16-stored vocabulary (a bf16 trainer's) still gives an fp32 forward
        t = input_ids.shape[1]
        cos, sin = rotary_tables(self.cfg, t, x.device, x.dtype)
        mask = attention_mask_for(attention_mask, t, x.device)
        for block in self.layers:
            x = block(x, cos, sin, mask)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class Head(nn.Linear):
    """The LM head; outside autocast it computes in its input's dtype whatever the weight's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        return F.linear(x, w, self.bias)


class LlamaForCausalLM(nn.Module):
    """The causal LM: `model` (embeddings, blocks, final norm) and `lm_head`, tied or not."""

    def __init__(self, cfg: LeanConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Head(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def base_model(self) -> LlamaModel:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_ignored
    ) -> SimpleNamespace:
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden), last_hidden_state=hidden)


def empty_model(config: dict) -> LlamaForCausalLM:
    """The model of `config` with its weights on the meta device: the loader assigns them."""
    with torch.device("meta"):
        return LlamaForCausalLM(LeanConfig.from_dict(config))


# --- the tokenizer --------------------------------------------------------------------


class LeanTokenizer:
    """The slice of the transformers tokenizer API the data pipeline uses, on `tokenizers`."""

    def __init__(self, files: dict[str, bytes]):
        from tokenizers import Tokenizer

        if "tokenizer.json" not in files:
            raise ValueError("no tokenizer.json among the tokenizer files")
        self._tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        conf = json.loads(files.get("tokenizer_config.json", b"{}"))
        self.special = {k: self._token_text(conf.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.chat_template = conf.get("chat_template")
        if "chat_template.jinja" in files:
            self.chat_template = files["chat_template.jinja"].decode("utf-8")
        self.eos_token = self.special["eos_token"]
        self.pad_token = self.special["pad_token"] or self.eos_token

    @staticmethod
    def _token_text(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.special["bos_token"])

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False):
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        # the same environment settings transformers renders chat templates with
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special.items() if v is not None},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text
