"""Backward pruning and the cheap forward: what makes sparse updates actually cheap.

- The frozen prefix (everything below the lowest trainable block) runs under
  `torch.no_grad()`, so it records no graph and keeps no activations; grad mode turns on
  at the lowest trainable block's entry (a forward pre-hook). `no_grad`, not
  `inference_mode`: inference tensors cannot enter a graph later.
- Never `enable_input_require_grads()` and never reentrant checkpointing on the prefix:
  both silently bring back a full-depth backward.
- Frozen weights outside the adapter blocks are kept in bf16 when computing in bf16
  (QuantLinear buffers stay packed; quant_forward.py rebuilds them cheaply); trainable and adapter-block weights stay fp32 so an
  untouched adapter weight comes back bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from offsite.emulators.families import Family


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bf16 where the hardware computes it natively, else fp32."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def store_frozen_weights(
    model: nn.Module, family: Family, keep_blocks: list[int], dtype: torch.dtype
) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Cast frozen floating parameters outside `keep_blocks` to `dtype`; returns what to undo."""
    if dtype == torch.float32:
        return []
    changed: list[tuple[nn.Parameter, torch.dtype]] = []
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
            continue
        seen.add(id(param))
        if family.block_index(name) in keep_blocks:
            continue
        changed.append((param, param.dtype))
        param.data = param.data.to(dtype)  # tied weights share the Parameter: cast once
    return changed


@torch.no_grad()
def undo_frozen_weights(changed: list[tuple[nn.Parameter, torch.dtype]]) -> None:
    """Give the caller back a model in its own dtypes (values keep the compute dtype's rounding)."""
    for param, dtype in changed:
        param.data = param.data.to(dtype)


@torch.no_grad()
def store_frozen_adapter_fp16(model: nn.Module, family: Family, blocks: list[int]) -> int:
    """Frozen adapter-block weights that fp16 holds exactly (bundles ship them as fp16) -> fp16.

    Exactness is checked per tensor, so an untouched weight still exports bit-identical.
    Their linears get `_half_weight_forward` until `restore_adapter_fp32`."""
    saved = 0
    for name, param in model.named_parameters():
        if param.requires_grad or param.dtype != torch.float32 or family.block_index(name) not in blocks:
            continue
        half = param.data.to(torch.float16)
        if torch.equal(half.to(torch.float32), param.data):
            saved += param.numel() * 2
            param.data = half
    for module in _block_linears(model, family, blocks):
        if "forward" not in vars(module):
            module.forward = lambda x, _m=module: _half_weight_forward(_m, x)
    return saved


def _block_linears(model: nn.Module, family: Family, blocks: list[int]) -> list[nn.Linear]:
    """The plain linears of `blocks`: the ones `store_frozen_adapter_fp16` patches and `restore_adapter_fp32` unpatches."""
    return [m for name, m in model.named_modules() if type(m) is nn.Linear and family.block_index(name) in blocks]


class _Scratch:
    """One compute-dtype buffer, reused by every frozen fp16 linear whose weight autograd does not keep."""

    buffer: torch.Tensor | None = None

    @classmethod
    def take(cls, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = cls.buffer
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != device:
            cls.buffer = b = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel]


# fp32 rows per piece of `half_to`: each piece's fp32 copy stays under the engine's 1 MiB mmap threshold
_HALF_PIECE_BYTES = 512 * 1024


def half_to(w: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`w.to(dtype)` for an fp16 `w`, through fp32 a piece at a time (same values).

    torch converts fp16 straight to bf16 in an unvectorised loop: 0.95 ms for a 1536 x 576
    weight against 0.17 ms through fp32 (one thread)."""
    out = torch.empty(w.shape, dtype=dtype, device=w.device) if out is None else out.view(w.shape)
    rows = max(1, _HALF_PIECE_BYTES // (4 * w[0].numel())) if w.dim() > 1 else w.shape[0]
    for r in range(0, w.shape[0], rows):
        out[r : r + rows] = w[r : r + rows].float()
    return out


def _half_weight_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A frozen fp16 linear under autocast: the weight cast as `half_to` does (autocast would
    take torch's slow fp16 -> bf16 loop and a fresh, page-faulted copy every call). While
    autograd may keep the weight (an input that needs a gradient) the copy is the layer's own;
    otherwise it goes into one scratch buffer that every such layer reuses."""
    w = module.weight
    if w.dtype != torch.float16 or not torch.is_autocast_enabled(x.device.type):
        return F.linear(x, w, module.bias)
    dtype = torch.get_autocast_dtype(x.device.type)
    keeps = torch.is_grad_enabled() and x.requires_grad
    out = None if keeps else _Scratch.take(w.numel(), dtype, w.device)
    bias = module.bias
    if bias is not None and bias.dtype == torch.float16:
        bias = half_to(bias, dtype)
    return F.linear(x.to(dtype), half_to(w, dtype, out), bias)


@torch.no_grad()
def train_in_fp32(params: list[nn.Parameter]) -> None:
    """Parameters that train hold fp32 (their gradients and optimizer state follow), even
    where the frozen copy was kept in fp16; the values are unchanged (fp16 -> fp32 is exact)."""
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)


@torch.no_grad()
def restore_adapter_fp32(model: nn.Module, family: Family, blocks: list[int]) -> None:
    """Undo `store_frozen_adapter_fp16` (exact) before deltas are folded into the weights."""
    for name, param in model.named_parameters():
        if family.block_index(name) in blocks and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
    for module in _block_linears(model, family, blocks):
        if "forward" in vars(module):
            del module.forward
    _Scratch.buffer = None


@contextlib.contextmanager
def pruned_backward(
    model: nn.Module, family: Family, lowest_block: int, checkpoint_blocks: bool = False
) -> Iterator[None]:
    """Inside, run the model's forward under `torch.no_grad()`: grad turns on at `lowest_block`.

    With `checkpoint_blocks`, blocks from `lowest_block` up recompute their activations in
    backward (non-reentrant checkpointing; the prefix is never checkpointed).
    """
    blocks = family.get_blocks(model)

    def enable_grad(_module, _args):
        torch.set_grad_enabled(True)  # the enclosing no_grad() restores the caller's mode on exit

    handles = [blocks[lowest_block].register_forward_pre_hook(enable_grad)]
    patched: list[nn.Module] = []
    if checkpoint_blocks:
        for block in list(blocks)[lowest_block:]:
            original = block.forward

            def wrapped(*args, _original=original, **kwargs):
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = wrapped
            patched.append(block)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for block in patched:
            del block.forward  # drop the instance attribute: the class method is back
