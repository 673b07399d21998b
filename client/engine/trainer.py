"""The training loop: scheme -> pruned, low-precision forward -> chunked loss -> optimizer.

`train_model` is the core and works on any causal LM given which blocks may train and how
its parameter names map to the base model's (identity for a full model, the emulator's
mapping for a bundle). `train_adapter` is the bundle entry point from the contract.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from offsite.emulators.data import Example, TokenBlocks, tokenize_examples
from offsite.emulators.families import Family
from offsite.emulators.losses import hidden_states, perplexity

from . import checkpoint as ckpt
from . import optim
from .config import TrainConfig, TrainResult
from .memory import (
    FAST_MMAP_THRESHOLD_BYTES,
    FAST_MODE_SLACK_MB,
    MB,
    current_rss_mb,
    peak_rss_mb,
    release_free_memory,
    set_malloc_policy,
)
from .headloss import frozen_head_nll
from .vocab import install_int8_vocab, int8_vocab_of
from .lowbit_kernels import install_lowbit_kernels
from .quant_forward import KERNELS
from .pruning import (
    autocast,
    resolve_precision,
    restore_adapter_fp32,
    store_frozen_adapter_fp16,
    store_frozen_weights,
    train_in_fp32,
    undo_frozen_weights,
)
from .schemes import apply_scheme, parse_scheme
from .stepper import EngineError, Stepper, make_optimizer


def _identity(name: str) -> str:
    return name


@dataclass
class EngineTarget:
    """What the engine trains: a model, where its trainable blocks are, and their original names."""

    model: nn.Module
    tokenizer: Any
    family: Family
    trainable_blocks: list[int]  # model block indices that may train (an emulator's adapter blocks)
    to_original: Callable[[str], str] = _identity  # model parameter name -> base model name
    base_digest: str = ""
    drop_tokenizer: Callable[[], None] | None = None  # forgets the owner's references (TrainConfig.release_tokenizer)
    int8_vocab: bool = False  # the tied vocabulary was shipped as int8 rows: train from int8 rows (vocab.py)

    def adapter_names(self) -> dict[str, str]:
        """Original name -> model name for every parameter of the trainable blocks."""
        out = {}
        for name, _ in self.model.named_parameters():
            if self.family.block_index(name) in self.trainable_blocks:
                out[self.to_original(name)] = name
        return out


@dataclass
class _Data:
    train: TokenBlocks
    heldout: TokenBlocks | None
    digest: str


def _subset(blocks: TokenBlocks, idx: torch.Tensor) -> TokenBlocks:
    return TokenBlocks(blocks.input_ids[idx], blocks.labels[idx], blocks.attention_mask[idx])


def prepare_data(examples: list[Example], tokenizer, cfg: TrainConfig) -> _Data:
    if not examples:
        raise EngineError("no training examples; pass a data file with at least one example")
    blocks = tokenize_examples(examples, tokenizer, cfg.block_size)
    n = len(blocks)
    n_eval = 0
    if cfg.eval_fraction > 0 and n >= 2:
        n_eval = min(n - 1, max(1, round(n * cfg.eval_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    train = _subset(blocks, order[n_eval:].sort().values)
    heldout = _subset(blocks, order[:n_eval].sort().values) if n_eval else None
    digest = hashlib.sha256(train.input_ids.numpy().tobytes() + train.labels.numpy().tobytes()).hexdigest()
    return _Data(train, heldout, digest)


def micro_batches(train: TokenBlocks, batch_size: int, seed: int, start: int, count: int):
    """Micro-batches number start..start+count-1 of an endless, per-epoch shuffled stream.

    Each epoch's order depends only on (seed, epoch), so a resumed run sees the same data."""
    per_epoch = math.ceil(len(train) / batch_size)
    for m in range(start, start + count):
        epoch, k = divmod(m, per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = order[k * batch_size : (k + 1) * batch_size]
        yield train.input_ids[idx], train.labels[idx], train.attention_mask[idx]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(10, cfg.steps // 10)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


@torch.no_grad()
def eval_ppl(model: nn.Module, blocks: TokenBlocks | None, cfg: TrainConfig, device, dtype) -> float | None:
    if blocks is None:
        return None
    head = model.get_output_embeddings()
    if int8_vocab_of(head) is not None:
        # the int8 vocabulary's sliced loss, as training computes it: the chunked cross-entropy
        # would hold a chunk's logits three times over (bf16, fp32, log-softmax), ~20 MB more
        total, count = 0.0, 0
        for i, (ids, labels, mask) in enumerate(blocks.batches(cfg.batch_size, shuffle=False)):
            if cfg.eval_batches is not None and i >= cfg.eval_batches:
                break
            with autocast(device, dtype):
                hidden = hidden_states(model, ids.to(device), mask.to(device))
                nll, n = frozen_head_nll(head, hidden, labels.to(device), cfg.loss_chunk_tokens, dtype)
            total, count = total + float(nll), count + n
        return math.exp(total / max(count, 1))
    return perplexity(
        model,
        blocks,
        cfg.batch_size,
        max_batches=cfg.eval_batches,
        device=device,
        chunk_tokens=cfg.loss_chunk_tokens,
        context=lambda: autocast(device, dtype),
    )


def _load_adapter_into(target: EngineTarget, state: dict[str, torch.Tensor]) -> None:
    names = target.adapter_names()
    params = dict(target.model.named_parameters())
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise EngineError(
            f"initial adapter has {len(unknown)} names that are not adapter parameters of this model, "
            f"e.g. {unknown[0]!r}; pass an adapter made for this bundle"
        )
    with torch.no_grad():
        for orig, value in state.items():
            p = params[names[orig]]
            if tuple(p.shape) != tuple(value.shape):
                raise EngineError(
                    f"initial adapter {orig!r} has shape {tuple(value.shape)}, the model {tuple(p.shape)}"
                )
            p.copy_(value)


def export_adapter(target: EngineTarget) -> dict[str, torch.Tensor]:
    """The FULL adapter state (every trainable-block parameter) by original name, fp32."""
    return {
        target.to_original(name): p.detach().to(torch.float32).clone()
        for name, p in target.model.named_parameters()
        if target.family.block_index(name) in target.trainable_blocks
    }


def count_step_flops(stepper: Stepper, batches, params: list[nn.Parameter]) -> int:
    """Matmul FLOPs of one forward+backward (no optimizer step; gradients are dropped)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        stepper.step(batches)
    for p in params:
        p.grad = None
    return int(counter.get_total_flops())


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr)


def train_model(
    target: EngineTarget,
    examples: list[Example],
    cfg: TrainConfig,
    progress: bool = True,
    initial_adapter: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `target`'s trainable blocks on `examples`; the model is left holding the result."""
    log = log or (_log_default if progress else (lambda _m: None))
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise EngineError("steps, batch_size and grad_accum must all be at least 1")
    model, family = target.model, target.family
    device = next(model.parameters()).device
    set_malloc_policy()
    dtype = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model.eval()  # dropout off: a seed makes runs repeatable and the probe comparable
    model.requires_grad_(False)
    if hasattr(model, "config"):
        model.config.use_cache = False
    data = prepare_data(examples, target.tokenizer, cfg)
    if cfg.release_tokenizer:
        target.tokenizer = None
        if target.drop_tokenizer is not None:
            target.drop_tokenizer()
    if initial_adapter:
        _load_adapter_into(target, initial_adapter)

    resume_from = ckpt.latest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir and cfg.resume else None
    resumed = ckpt.load_checkpoint(resume_from) if resume_from else None
    if resumed:
        saved = resumed[2]
        if saved["fingerprint"] != cfg.fingerprint() or saved["data_digest"] != data.digest:
            raise ckpt.CheckpointError(
                f"{resume_from} was written by a run with other settings or data; use another --checkpoint-dir "
                "(or delete it) to start afresh, or resume with the same settings and data"
            )

    if cfg.lowbit_kernel not in KERNELS:
        raise EngineError(f"lowbit kernel must be one of {', '.join(KERNELS)}, got {cfg.lowbit_kernel!r}")
    cast_back = store_frozen_weights(model, family, target.trainable_blocks, dtype)
    # the shipped int8 vocabulary back in int8 rows: half the memory of its bf16 copy
    undo_vocab = install_int8_vocab(model, dtype) if target.int8_vocab and dtype != torch.float32 else None
    if dtype != torch.float32:
        # the frozen adapter in fp16 where that is exact (bundles ship it so), before the
        # budget reads RSS: 2 bytes a weight less for everything that does not train
        store_frozen_adapter_fp16(model, family, target.trainable_blocks)
    release_free_memory()  # before the int8 rows are built: the bf16 vocabulary's pages are gone
    kernels = install_lowbit_kernels(model, cfg, dtype)
    fast = kernels.all_int8 and cfg.memory_budget_mb is None  # no budget: memory for speed
    release_free_memory()  # loading and tokenizing leave freed pages behind; the budget sees RSS
    choice = None
    if resumed:
        spec = resumed[2]["scheme_spec"]
    elif cfg.memory_budget_mb is not None:
        from .budget import choose_scheme

        choice = choose_scheme(target, data.train, cfg, device, dtype, log=log)
        spec = choice.spec
        release_free_memory()  # the probes' freed buffers: the run starts from the estimate's base
        # the estimate leaves out the step's transient buffers (measured 35-55 MB over it on the
        # shipped emulator), so the int8 weights only take room beyond that slack
        room = (choice.budget_mb - choice.estimate_mb - FAST_MODE_SLACK_MB) * MB
        kernels.widen(room)
        release_free_memory()  # the codes the int8 rows replaced
        fast = kernels.all_int8 and room >= FAST_MODE_SLACK_MB * MB  # and the allocator's slack
        if kernels.layers:
            log(
                f"low-bit kernel: int8 for {kernels.int8_layers} of {len(kernels.layers)} layers "
                f"({kernels.int8_cache_mb:.0f} MB, in place of their packed codes; {kernels.dropped_channels} "
                "pruned MLP channels dropped)" + ("" if kernels.all_int8 else ", the rest rebuilt each step")
            )
    else:
        spec = cfg.scheme
    if fast:  # the whole int8 cache and room for the allocator to keep activations in its heap
        set_malloc_policy(FAST_MMAP_THRESHOLD_BYTES)
    plan = parse_scheme(spec, target.trainable_blocks)
    applied = apply_scheme(model, family, plan, cfg.channel_targets, cfg.lora_alpha_ratio)
    params = [p for _, p in applied.trainable_parameters()]
    train_in_fp32(params)
    optimizer = make_optimizer(params, cfg)
    scheduler = optim.LambdaSchedule(optimizer, lr_lambda(cfg))
    step_cfg = replace(cfg, sequences_per_pass=kernels.sequences_per_pass(cfg))
    stepper = Stepper(model, family, applied, step_cfg, device, dtype)

    state = {"losses": [], "tokens": 0, "loss_tokens": 0, "train_seconds": 0.0, "eval_ppl_before": None}
    start = 0
    if resumed:
        trainable, opt_state, saved, rng = resumed
        named = dict(applied.trainable_parameters())
        if set(trainable) != set(named):
            raise ckpt.CheckpointError(f"{resume_from} holds other trainable parameters than scheme {spec!r}")
        with torch.no_grad():
            for name, value in trainable.items():
                named[name].copy_(value)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(rng)
        state = saved["progress"]
        start = saved["step"]
        log(f"resuming from {resume_from} at step {start}")
    else:
        state["eval_ppl_before"] = eval_ppl(model, data.heldout, cfg, device, dtype)

    fingerprint = cfg.fingerprint()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"training ({spec})", unit="step", file=sys.stderr)
    micro = cfg.grad_accum
    for step in range(start, cfg.steps):
        batches = list(micro_batches(data.train, cfg.batch_size, cfg.seed, step * micro, micro))
        t0, c0 = time.perf_counter(), time.process_time()
        loss, n_loss = stepper.step(batches)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seconds = time.perf_counter() - t0
        state["train_seconds"] += seconds
        state["train_cpu_seconds"] = state.get("train_cpu_seconds", 0.0) + time.process_time() - c0
        state.setdefault("step_seconds", []).append(round(seconds, 4))
        state["tokens"] += sum(int(m.sum()) for _, _, m in batches)
        state["loss_tokens"] += n_loss
        state["losses"].append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if cfg.checkpoint_dir and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            ckpt.save_checkpoint(
                cfg.checkpoint_dir,
                done,
                {n: p for n, p in applied.trainable_parameters()},
                optimizer.state_dict(),
                {
                    "fingerprint": fingerprint,
                    "data_digest": data.digest,
                    "scheme_spec": spec,
                    "scheduler": scheduler.state_dict(),
                    "progress": state,
                },
            )
        if on_step is not None:
            on_step(done, loss)
    if bar is not None:
        bar.close()
    train_peak_mb = peak_rss_mb()
    flops_per_step = None
    if cfg.count_flops:
        # after training: the FLOP counter imports sympy (~70 MB), which no real client pays
        flops_per_step = count_step_flops(
            stepper, list(micro_batches(data.train, cfg.batch_size, cfg.seed, 0, cfg.grad_accum)), params
        )

    trainable_params, lowest_block = applied.trainable_params, applied.lowest_block
    del optimizer, scheduler, params
    restore_adapter_fp32(model, family, target.trainable_blocks)
    applied.finalize()
    eval_after = eval_ppl(model, data.heldout, cfg, device, dtype)
    adapter = export_adapter(target)
    # the caller (e.g. a Flower client evaluating without autocast) gets its dtypes back
    if undo_vocab is not None:
        undo_vocab()
    undo_frozen_weights(cast_back)
    kernels.undo()
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10) :]
    metrics = {
        "scheme": spec,
        "scheme_resolved": plan.spec(),
        "examples": len(examples),
        "num_examples": len(examples),
        "train_blocks": len(data.train),
        "heldout_blocks": len(data.heldout) if data.heldout is not None else 0,
        "steps": cfg.steps,
        "tokens": state["tokens"],
        "loss_tokens": state["loss_tokens"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_last_avg": sum(tail) / len(tail) if tail else None,
        "losses": losses,
        "eval_ppl_before": state["eval_ppl_before"],
        "eval_ppl_after": eval_after,
        "peak_rss_mb": train_peak_mb,  # of the process until the end of training (loading included)
        "rss_mb_end": current_rss_mb(),
        "train_seconds": state["train_seconds"],
        "step_seconds": state.get("step_seconds", []),
        "tokens_per_s": state["tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0,
        # CPU time of the process (all its threads): steadier than wall time on a shared machine
        "train_cpu_seconds": state.get("train_cpu_seconds"),
        "tokens_per_cpu_s": state["tokens"] / state["train_cpu_seconds"] if state.get("train_cpu_seconds") else None,
        "trainable_params": trainable_params,
        "lowest_trainable_block": lowest_block,
        "precision": str(dtype).replace("torch.", ""),
        "optimizer": cfg.optimizer,
        "added_biases": applied.added_biases,
        "resumed_from_step": start,
        "flops_per_step": flops_per_step,
        "lowbit_int8_layers": kernels.int8_layers,
        "fast_mode": fast,
        "int8_vocab": undo_vocab is not None,
        "lowbit_layers": len(kernels.layers),
        "lowbit_int8_cache_mb": kernels.int8_cache_mb,
        "dropped_mlp_channels": kernels.dropped_channels,
    }
    if choice is not None:
        metrics["budget"] = choice.as_dict()
    return TrainResult(adapter_state=adapter, metrics=metrics)


def _vocab_shipped_int8(bundle) -> bool:
    encoded = (getattr(bundle, "manifest", None) or {}).get("storage", {}).get("encoded", {})
    emb = bundle.model.get_input_embeddings() if hasattr(bundle.model, "get_input_embeddings") else None
    names = [n for n, p in bundle.model.named_parameters() if emb is not None and p is emb.weight]
    originals = {bundle.to_original(n) for n in names} | set(names)
    return any(encoded.get(n, {}).get("codec") == "int8-row" for n in originals)


def train_adapter(
    bundle,
    examples: list[Example],
    cfg: TrainConfig,
    progress: bool = True,
    initial_adapter: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a loaded bundle's adapter (emulator.bundle.EmulatorBundle) on local examples.

    Returns the FULL adapter state keyed by original names (LoRA merged, deltas folded) and
    the metrics record; the bundle's model is left holding the trained adapter."""
    target = EngineTarget(
        model=bundle.model,
        tokenizer=bundle.tokenizer,
        family=bundle.family,
        trainable_blocks=list(bundle.adapter_positions),
        to_original=bundle.to_original,
        base_digest=bundle.base_digest,
        drop_tokenizer=lambda: setattr(bundle, "tokenizer", None),
        int8_vocab=_vocab_shipped_int8(bundle),
    )
    return train_model(
        target, examples, cfg, progress=progress, initial_adapter=initial_adapter, on_step=on_step, log=log
    )
