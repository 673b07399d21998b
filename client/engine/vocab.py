"""The frozen, tied vocabulary matrix as int8 rows while training: half a bf16 copy's memory.

SmolLM2's token embedding (tied to the LM head) is 49152 x 576: 57 MB in bf16, the largest
frozen tensor a client holds. Bundles store it as int8 rows already (emulators.vocab_codec);
here the decoded matrix is quantized back to int8 rows (per-row symmetric, fp32 scale), which
reproduces the bundle's codes up to the bf16 rounding of the decoded values, and the bf16
copy is dropped. The three readers of the matrix then work from the codes, a slice at a time:

- the embedding lookup gathers rows and scales them;
- the head's logits (evaluation) multiply by the codes in bf16 (exact: |code| <= 127) slice by
  slice and scale each logit column;
- the training loss (headloss.py) runs an online softmax over vocabulary slices, so the
  loss and its input gradient need no vocabulary-wide buffer.

The parameter keeps its shape as a stride-0 view of one element, so code that reads shapes
still works; nothing may read its values while installed (undo decodes them back).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

SLICE_ROWS = 1024  # vocabulary rows per slice: for 1024 tokens, 8 MB of logits workspace


class Int8Vocab:
    """W ~= codes * scale[:, None]: codes int8 [vocab, hidden], scale fp32 [vocab]."""

    def __init__(self, weight: torch.Tensor):
        v = weight.shape[0]
        self.codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        self.scale = torch.empty(v, dtype=torch.float32, device=weight.device)
        for i in range(0, v, SLICE_ROWS):
            w = weight[i : i + SLICE_ROWS].detach().to(torch.float32, copy=True)
            s = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            self.codes[i : i + SLICE_ROWS] = w.div_(s[:, None]).round_().clamp_(-127, 127)
            self.scale[i : i + SLICE_ROWS] = s

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def rows(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.codes[idx].float() * self.scale[idx].unsqueeze(-1)).to(dtype)

    def slices(self, dtype: torch.dtype):
        """(start, codes slice in `dtype` [n, hidden], scale slice fp32 [n]) over the vocabulary."""
        for i in range(0, self.codes.shape[0], SLICE_ROWS):
            yield i, self.codes[i : i + SLICE_ROWS].to(dtype), self.scale[i : i + SLICE_ROWS]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.codes.shape, dtype=dtype, device=self.codes.device)
        for i in range(0, self.codes.shape[0], SLICE_ROWS):
            out[i : i + SLICE_ROWS] = self.rows(torch.arange(i, min(i + SLICE_ROWS, out.shape[0])), dtype)
        return out

    def logits(self, x: torch.Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        out = torch.empty(h.shape[0], self.codes.shape[0], dtype=out_dtype, device=x.device)
        for i, codes, scale in self.slices(compute_dtype):
            out[:, i : i + codes.shape[0]] = (h @ codes.t()).float().mul_(scale)
        return out.view(*x.shape[:-1], -1)


def int8_vocab_of(head: nn.Module) -> Int8Vocab | None:
    return getattr(head, "_offsite_int8_vocab", None)


def install_int8_vocab(model: nn.Module, dtype: torch.dtype) -> Callable[[], None] | None:
    """Hold the tied, frozen vocabulary as int8 rows; returns the undo (None: not applicable).

    Applies when the embedding and the LM head share one frozen weight and the head has no bias."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or getattr(head, "bias", None) is not None:
        return None
    weight = emb.weight
    if head.weight is not weight or weight.requires_grad or weight.dim() != 2:
        return None
    stored_dtype = weight.dtype
    vocab = Int8Vocab(weight.data)
    weight.data = torch.zeros(1, 1, dtype=stored_dtype, device=weight.device).expand(*vocab.shape)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return vocab.rows(ids, stored_dtype)

    def logits(x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        compute = dtype if autocast else x.dtype
        return vocab.logits(x, compute, compute)

    emb.forward, head.forward = embed, logits
    head._offsite_int8_vocab = vocab

    def undo() -> None:
        del emb.forward, head.forward, head._offsite_int8_vocab
        weight.data = vocab.dense(stored_dtype)

    return undo
