"""What a training run is asked to do (`TrainConfig`) and what it returns (`TrainResult`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch


@dataclass
class TrainConfig:
    """One client training run. Field names follow the cross-team contract (contracts.md)."""

    scheme: str = "full"  # see schemes.py for the spec syntax, e.g. "top:full,bottom:norms"
    # when set, the scheme is chosen by budget.py instead: MB, or "auto" (the minimum this
    # machine measures at run time plus budget.AUTO_MARGIN_MB)
    memory_budget_mb: float | str | None = None
    steps: int = 50
    lr: float = 1e-4
    optimizer: str = "adamw"  # "adamw" or "sgd" (no optimizer state)
    batch_size: int = 4
    grad_accum: int = 1
    # sequences of a micro-batch that one forward+backward pass takes (None: all of them); the
    # loss and gradient are the same sums either way (up to their order). One: a 256-token
    # sequence's activations stay under the engine's 1 MiB mmap threshold (memory.py), so they
    # are reused from the heap instead of mapped and page-faulted afresh, and backward keeps a
    # quarter of the batch's. Shipped emulator, int8 kernel, batch 4 x 256, one thread: 2.19
    # CPU-s a step at a 540 MB peak, against 2.6-2.8 s whole-batch (or 2.17 s at 577 MB with
    # the 4 MiB threshold)
    sequences_per_pass: int | None = 1
    block_size: int = 256
    warmup_steps: int | None = None  # None: a tenth of the steps, at most 10
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_fraction: float = 0.1  # held-out slice of the client's own blocks
    eval_batches: int | None = 16  # cap on held-out batches per evaluation (None: all of them)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end when checkpoint_dir is set)
    resume: bool = True  # continue from checkpoint_dir's latest checkpoint when there is one
    precision: str = "auto"  # "fp32" | "bf16" | "auto" (bf16 where the CPU/GPU computes it natively)
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 64  # tokens per chunk of the LM head + loss (64 x 49k fp32 logits: 12.6 MB)
    fused_head_loss: bool = True  # frozen head: input gradient formed in the forward pass (headloss.py)
    channel_targets: tuple[str, ...] | None = None  # linear names for channels:R (None: input projections)
    lora_alpha_ratio: float = 2.0  # lora_alpha = ratio * rank
    # drop the tokenizer once the data is tokenized (the bundle's too): ~30-45 MB of RSS for a
    # 49k-token BPE vocabulary that training never uses; for callers that need it no more
    release_tokenizer: bool = False
    # the frozen low-bit middle's kernel (quant_forward.py, lowbit_kernels.py): "int8" (int8 rows in
    # place of the packed codes, int8 x int8 matmuls: faster, ~0.4 byte a weight more), "dequant"
    # (rebuilt each pass, no int8 rows) or "auto": int8 everywhere with no budget or the "auto"
    # budget (measured after it), else for as many layers as a budget in MB leaves room for
    lowbit_kernel: str = "auto"
    count_flops: bool = False  # measure one step's FLOPs (FlopCounterMode) before training; not timed
    probe_steps: int = 3  # contribution analysis: steps per candidate unit
    probe_batches: int = 1

    def fingerprint(self) -> dict:
        """The fields that must match for a checkpoint to be resumed."""
        keep = (
            "scheme",
            "memory_budget_mb",
            "steps",
            "lr",
            "optimizer",
            "batch_size",
            "grad_accum",
            "block_size",
            "warmup_steps",
            "min_lr_ratio",
            "weight_decay",
            "max_grad_norm",
            "seed",
            "eval_fraction",
            "precision",
            "channel_targets",
            "lora_alpha_ratio",
        )
        d = dataclasses.asdict(self)
        return json.loads(json.dumps({k: d[k] for k in keep}, default=list))


@dataclass
class TrainResult:
    adapter_state: dict[str, torch.Tensor]  # FULL adapter, keyed by original names, fp32
    metrics: dict = field(default_factory=dict)
