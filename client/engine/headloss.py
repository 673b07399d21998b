"""The LM-head loss for a frozen head: chunked, and with its input gradient in the same pass.

`emulators.losses` checkpoints each chunk, so the 49k-wide logits are computed twice
(forward, then again in backward). The head never trains here (it is tied to the frozen
embeddings), so the only gradient needed is d(loss)/d(hidden), and it can be formed while
the chunk's logits are still at hand: softmax - one-hot, times W. Each chunk's logits live
only inside the loop, the head GEMM runs once forward and once for the gradient, and the
saved state is a (tokens x hidden) gradient.
"""

from __future__ import annotations

import torch

from offsite.emulators.losses import loss_positions

from . import vocab as vocab_slices
from .vocab import Int8Vocab, int8_vocab_of


class _FrozenHeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        ctx.hidden_dtype = hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            # Two vocabulary-wide buffers for the whole loop, reused by every chunk: fresh ones
            # per chunk would be ~25 MB of page-faulted memory each time (400 MB a step).
            n0 = min(chunk, hidden.shape[0])
            low = torch.empty(n0, w.shape[0], dtype=compute_dtype, device=hidden.device)
            fp32 = compute_dtype == torch.float32
            logits_buf = low if fp32 else torch.empty(n0, w.shape[0], device=hidden.device)
            for i in range(0, hidden.shape[0], chunk):
                h = hidden[i : i + chunk].to(compute_dtype)
                y = targets[i : i + chunk]
                n = h.shape[0]
                torch.matmul(h, w.t(), out=low[:n])
                logits = logits_buf[:n]
                if not fp32:
                    logits.copy_(low[:n])
                target = logits.gather(1, y[:, None]).squeeze(1)
                # log-sum-exp by hand, in place: torch.logsumexp would allocate a second
                # vocabulary-wide fp32 buffer
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()
                norm = probs.sum(dim=-1, keepdim=True)
                total += (norm.log() + peak).squeeze(1).sub(target).sum()
                if need_grad:
                    probs.div_(norm)  # softmax
                    probs[torch.arange(n, device=y.device), y] -= 1.0
                    if not fp32:
                        low[:n].copy_(probs)
                    grad[i : i + chunk] = low[:n] @ w
            del low, logits_buf
        if need_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.hidden_dtype), None, None, None, None


class _Int8HeadNLL(torch.autograd.Function):
    """The same loss and input gradient from an int8 vocabulary (vocab.py), one slice of rows at a
    time for all tokens: an online softmax (running max m, normaliser z, and z-weighted sum of
    rows for the gradient), so no buffer spans the vocabulary.

    int8_logits: the logits come from an int8 x int8 matmul (`torch._int_mm`) of the hidden
    states quantized per token (symmetric, scale = max|h| / 127: the input quantization the int8
    middle already applies, quant_forward.py) with the vocabulary's own codes: 0.16 instead of
    0.30 CPU-s a step for SmolLM2's 49k rows (4 passes of 256 tokens, one thread). The gradient's
    matmul (softmax weights times rows) is int8 too: each token's weights in a slice are
    quantized against their own maximum (so a slice of tail tokens keeps its resolution) with a
    fixed uniform dither before rounding, and the codes are used as they are (no compute-dtype
    copy): ~0.12 CPU-s a step less. The dither matters: rounding to nearest drops every weight
    under half a step, the same tail in every slice and token, and that bias adds up over
    tokens. Measured on the shipped bundle's final hidden states (4 x 255 tokens, against fp32),
    relative error of the gradient per token / summed over the tokens: exact path 0.16% / 0.5%,
    int8 logits 6.8% / 4.6%, int8 weights rounded to nearest 1.6% / 24%, dithered 1.2% / 1.0%.
    The loss: 3.192 exact, 3.203 with int8 logits."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        vocab: Int8Vocab,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        int8_logits: bool = False,
    ):
        need_grad = ctx.needs_input_grad[0]
        ctx.hidden_dtype = hidden.dtype
        n, dev = hidden.shape[0], hidden.device
        with torch.autocast(device_type=dev.type, enabled=False):
            h = hidden.to(compute_dtype)
            m = torch.full((n,), -torch.inf, device=dev)
            z = torch.zeros(n, device=dev)
            target = torch.zeros(n, device=dev)
            acc = torch.zeros(hidden.shape, device=dev) if need_grad else None
            rows = torch.arange(n, device=dev)
            # One set of slice-sized buffers for the whole loop. Fresh per slice, each (4 MB of fp32
            # logits for 1024 tokens) is above the engine's 1 MiB mmap threshold, so it was mapped
            # and page-faulted afresh 48 times a step: 1.00 -> 0.76 CPU-s for the head's loss and
            # gradient (SmolLM2's 49k int8 vocabulary, 1024 tokens, one thread), bit-identical.
            rows_max = min(vocab_slices.SLICE_ROWS, vocab.shape[0])
            codes_buf = torch.empty(rows_max, hidden.shape[1], dtype=compute_dtype, device=dev)
            low_buf = torch.empty(n, rows_max, dtype=compute_dtype, device=dev)
            logits_buf = torch.empty(n, rows_max, device=dev)
            grad_part = torch.empty(hidden.shape, dtype=compute_dtype, device=dev) if need_grad else None
            # _int_mm wants more than 16 rows and sizes in multiples of 8; a short last slice
            # takes the compute-dtype path
            int8_logits = int8_logits and n > 16 and hidden.shape[1] % 8 == 0 and rows_max % 8 == 0
            if int8_logits:
                h_scale = h.float().abs().amax(dim=1).div_(127.0).clamp_min_(1e-12)
                h_codes = h.float().div_(h_scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
                int_buf = torch.empty(n, rows_max, dtype=torch.int32, device=dev)
                if need_grad:
                    p_codes = torch.empty(n, rows_max, dtype=torch.int8, device=dev)
                    int_grad = torch.empty(hidden.shape, dtype=torch.int32, device=dev)
                    # fixed seed: the same run gives the same gradient (a resumed one too)
                    dither = torch.rand(n, rows_max, generator=torch.Generator(dev).manual_seed(0), device=dev)
                    dither.sub_(0.5)
            for start in range(0, vocab.shape[0], rows_max):
                k = min(rows_max, vocab.shape[0] - start)
                scale = vocab.scale[start : start + k]
                low = low_buf if k == rows_max else low_buf[:, :k]
                logits = logits_buf if k == rows_max else logits_buf[:, :k]
                fast = int8_logits and k == rows_max
                if not fast:
                    codes = codes_buf[:k].copy_(vocab.codes[start : start + k])  # exact: |code| <= 127
                if fast:
                    torch._int_mm(h_codes, vocab.codes[start : start + k].t(), out=int_buf)
                    logits.copy_(int_buf).mul_(scale).mul_(h_scale[:, None])
                else:
                    if k == rows_max:
                        torch.matmul(h, codes.t(), out=low)
                    else:  # a shorter last slice: its view of the buffer is not contiguous
                        low.copy_(h @ codes.t())
                    logits.copy_(low).mul_(scale)
                hit = (targets >= start) & (targets < start + k)
                target[hit] = logits[rows[hit], targets[hit] - start]
                m_new = torch.maximum(m, logits.amax(dim=1))
                rescale = torch.exp(m - m_new)
                p = logits.sub_(m_new[:, None]).exp_()
                z.mul_(rescale).add_(p.sum(dim=1))
                if need_grad and fast:
                    w = p.mul_(scale)  # the rows' weights, 0 < w <= max scale
                    w_scale = w.amax(dim=1, keepdim=True).div_(127.0).clamp_min_(1e-30)
                    p_codes.copy_(w.div_(w_scale).add_(dither).round_())  # unbiased: E[round(v + U)] = v
                    torch._int_mm(p_codes, vocab.codes[start : start + k], out=int_grad)
                    acc.mul_(rescale[:, None]).add_(int_grad.float().mul_(w_scale))
                elif need_grad:
                    low.copy_(p.mul_(scale))
                    torch.matmul(low, codes, out=grad_part)
                    acc.mul_(rescale[:, None]).add_(grad_part)
                m = m_new
            total = (m + z.log() - target).sum()
            del codes_buf, low_buf, logits_buf, grad_part
            if int8_logits:
                del h_codes, int_buf
                if need_grad:
                    del p_codes, int_grad, dither
        if need_grad:
            # d(loss)/dh = softmax @ W - W[target]
            ctx.save_for_backward(acc.div_(z[:, None]).sub_(vocab.rows(targets, torch.float32)))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.hidden_dtype), None, None, None, None


def frozen_head_nll(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 256,
    compute_dtype: torch.dtype = torch.float32,
    int8_logits: bool = False,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over labels != IGNORE_INDEX, and their count (head frozen, no bias).

    int8_logits: with an int8 vocabulary, its training logits from int8 x int8 matmuls (_Int8HeadNLL)."""
    h, y = loss_positions(hidden, labels)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    vocab = int8_vocab_of(head)
    if vocab is not None:
        return _Int8HeadNLL.apply(h, vocab, y, compute_dtype, int8_logits), n
    return _FrozenHeadNLL.apply(h, head.weight, y, chunk_tokens, compute_dtype), n
