"""Distillation of the emulator: the middle learns to stand in for the blocks it replaces.

Only the emulator's middle blocks train; the adapter blocks, embeddings, final norm and
LM head stay frozen at their pretrained values (the client starts from them). The loss is
the paper's:

    LM loss(emulator) + w * MSE(teacher middle output, emulator middle output) / RMS(teacher)

matched where the middle hands over to the top adapter. Options beyond the paper:
``match="all"`` also matches every kept middle block's output against the teacher's output
of the block it came from (denser signal for an emulator that keeps every block), and
``kl_weight`` adds KL(teacher || emulator) on the next-token distributions.

Quantization-aware distillation (``quant_bits``): the middle's Linear weights are seen
through a straight-through fake quantizer of the bits they will be stored at, so the
latent fp32 weights learn to round well; the caller quantizes them for real afterwards.

Runs are resumable: every `checkpoint_every` steps the middle's weights, the AdamW
moments and the step are written into `checkpoint_dir` (a new ``step-N`` directory, then
``latest.json`` is replaced atomically, so a crash never leaves a half checkpoint). The
state with the best held-out emulator perplexity is kept in ``best/`` and loaded back at
the end. Data order is a pure function of (seed, step), so a resumed run sees the batches
an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from offsite.files import atomic_dir, atomic_write

from .data import TokenBlocks, perplexity
from .losses import CHUNK_TOKENS, lm_nll_from_hidden
from .models import LoadedModel
from .quantize import DEFAULT_GROUP_SIZE, QuantLinear, effective_group_size, quantize_weight
from .split import SplitPlan

CHECKPOINT_FORMAT = "offsite-distill/1"


class DistillError(ValueError):
    """Distillation cannot run as asked (nothing trainable, a foreign checkpoint, ...)."""


# --- straight-through fake quantization ----------------------------------------------


class FakeQuantSTE(nn.Module):
    """Parametrization: weight -> its low-bit grid value in forward, identity gradient."""

    def __init__(self, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = effective_group_size(w.shape[1], self.bits, self.group_size)
        with torch.no_grad():
            codes, scales, zeros = quantize_weight(w, self.bits, g)
            deq = (codes.view(w.shape[0], -1, g).float() - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
            deq = deq.view_as(w).to(w.dtype)
        return w + (deq - w).detach()


def _add_fake_quant(block: nn.Module, bits: int, group_size: int) -> list[nn.Linear]:
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        parametrize.register_parametrization(m, "weight", FakeQuantSTE(bits, group_size))
    return linears


def _remove_fake_quant(linears: list[nn.Linear]) -> None:
    for m in linears:
        if parametrize.is_parametrized(m, "weight"):
            # Keep the latent fp32 weights: the real quantizer rounds them afterwards.
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


# --- helpers -------------------------------------------------------------------------


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    """Raised by a hook once the teacher has produced every hidden state we need: the
    remaining blocks and the 49k-wide LM head would be wasted compute."""


def batch_at(
    train: TokenBlocks, step: int, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of `step`: epochs are fixed permutations seeded by (seed, epoch), so the
    order depends on nothing but these numbers (resume sees the same data)."""
    per_epoch = max(len(train) // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = perm[i * batch_size : (i + 1) * batch_size]
    return train.input_ids[idx], train.labels[idx], train.attention_mask[idx]


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    with atomic_dir(final, overwrite=True) as tmp:
        write(tmp)


def _atomic_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


# --- the distillation loop -------------------------------------------------------------


@dataclass
class DistillConfig:
    """One distillation run (like the client engine's TrainConfig: every knob, with defaults)."""

    steps: int = 0
    lr: float = 1e-4
    mse_weight: float = 30.0  # weight of the RMS-normalised MSE at the matched blocks' outputs
    batch_size: int = 4
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    weight_decay: float = 0.0
    lm_weight: float = 1.0
    match: str = "output"  # "output": the middle's output only; "all": every kept block
    kl_weight: float = 0.0  # KL to the teacher's logits
    # emulator position -> bits it will be stored at (quantization-aware distillation)
    quant_bits: dict[int, int | None] | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    eval_every: int | None = None  # None: steps // 4
    eval_blocks: int | None = None  # None: all of `heldout`
    checkpoint_every: int | None = None  # None: steps // 10
    seed: int = 0


def distill_emulator(
    teacher: LoadedModel,
    emulator: nn.Module,
    plan: SplitPlan,
    train: TokenBlocks,
    heldout: TokenBlocks,
    cfg: DistillConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_progress: Callable[[float, str], None] | None = None,
) -> dict:
    """Distill `emulator` (built from `teacher` by `plan`) in place; see the module docstring.

    `cfg.quant_bits` maps emulator positions of middle blocks to the bits they will be stored
    at (quantization-aware distillation). Returns a report: steps, best_step, best_ppl,
    ppl_before, ppl_final, losses (per step), seconds, s_per_step, resumed_from.
    """
    steps, lr, mse_weight, batch_size = cfg.steps, cfg.lr, cfg.mse_weight, cfg.batch_size
    warmup_steps, weight_decay, lm_weight, match = cfg.warmup_steps, cfg.weight_decay, cfg.lm_weight, cfg.match
    kl_weight, quant_bits, group_size, seed = cfg.kl_weight, cfg.quant_bits, cfg.group_size, cfg.seed
    eval_every, eval_blocks, checkpoint_every = cfg.eval_every, cfg.eval_blocks, cfg.checkpoint_every
    if steps < 0:
        raise DistillError(f"steps must be 0 or more, got {steps}")
    if match not in ("output", "all"):
        raise DistillError(f"match must be 'output' or 'all', got {match!r}")
    family = teacher.family
    positions = plan.emulator_positions
    if not positions:
        raise DistillError("the emulator has no middle blocks to distill; keep at least one (--emulator-layers >= 1)")
    if len(train) < batch_size:
        raise DistillError(
            f"the corpus has {len(train)} blocks, fewer than one batch of {batch_size}; add data or lower the batch size"
        )
    emu_blocks = family.get_blocks(emulator)
    teacher_blocks = family.get_blocks(teacher.model)
    trainable = {n: p for n, p in emulator.named_parameters() if family.block_index(n) in set(positions)}
    if not trainable or any(isinstance(m, QuantLinear) for p in positions for m in emu_blocks[p].modules()):
        raise DistillError(
            "the emulator's middle has no trainable parameters (already quantized?); distill before quantizing, "
            "or pass quant_bits for quantization-aware distillation"
        )
    eval_set = (
        heldout
        if eval_blocks is None
        else TokenBlocks(
            heldout.input_ids[:eval_blocks], heldout.labels[:eval_blocks], heldout.attention_mask[:eval_blocks]
        )
    )
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    eval_every = eval_every or max(steps // 4, 1)
    checkpoint_every = checkpoint_every or max(steps // 10, 1)

    # Where to match: emulator position -> original block whose output it stands for.
    last = positions[-1]
    matched = {p: plan.layer_origin[p] for p in (positions if match == "all" else [last])}

    fq_linears: list[nn.Linear] = []
    if quant_bits:
        for p, bits in quant_bits.items():
            if bits is not None and p in set(positions):
                fq_linears += _add_fake_quant(emu_blocks[p], bits, group_size)
        trainable = {n: p for n, p in emulator.named_parameters() if family.block_index(n) in set(positions)}

    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    meta_id = {
        "format": CHECKPOINT_FORMAT,
        "base_digest": teacher.digest,
        "layer_origin": plan.layer_origin,
        "steps": steps,
        "lr": lr,
        "mse_weight": mse_weight,
        "match": match,
        "kl_weight": kl_weight,
        "quant_bits": {str(k): v for k, v in (quant_bits or {}).items()},
        "seed": seed,
        "batch_size": batch_size,
    }
    start, best_ppl, best_step, ppl_before, losses, resumed_from = 0, math.inf, -1, None, [], None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        latest = ckpt / "latest.json"
        if latest.exists():
            state = json.loads(latest.read_text())
            if state.get("id") != meta_id:
                raise DistillError(
                    f"{ckpt} holds a checkpoint of a different distillation ({_diff(state.get('id'), meta_id)}); "
                    "use another checkpoint directory or delete this one"
                )
            _load_checkpoint(ckpt / state["dir"], emulator, trainable, opt)
            start, best_ppl, best_step = state["step"], state["best_ppl"], state["best_step"]
            ppl_before, losses, resumed_from = state["ppl_before"], state["losses"], state["step"]

    def save_checkpoint(step: int) -> None:
        if ckpt is None:
            return
        name = f"step-{step}"
        _atomic_dir(ckpt / name, lambda d: _write_state(d, trainable, opt))
        _atomic_json(
            ckpt / "latest.json",
            {
                "id": meta_id,
                "dir": name,
                "step": step,
                "best_ppl": best_ppl,
                "best_step": best_step,
                "ppl_before": ppl_before,
                "losses": losses,
            },
        )
        for old in ckpt.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def evaluate() -> float:
        emulator.eval()
        return perplexity(emulator, eval_set, batch_size=batch_size)

    best_state: dict[str, torch.Tensor] | None = None

    last_ppl: list[float] = []

    def consider_best(step: int, ppl: float) -> None:
        nonlocal best_ppl, best_step, best_state
        last_ppl.append(ppl)
        if ppl < best_ppl:
            best_ppl, best_step = ppl, step
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
            if ckpt is not None:
                _atomic_dir(
                    ckpt / "best",
                    lambda d: (
                        save_file({k: v.contiguous() for k, v in best_state.items()}, str(d / "middle.safetensors")),
                        (d / "best.json").write_text(json.dumps({"step": step, "ppl": ppl})),
                    ),
                )

    if ppl_before is None:
        ppl_before = evaluate()
        consider_best(0, ppl_before)
    elif ckpt is not None and (ckpt / "best" / "middle.safetensors").exists():
        best_state = load_file(str(ckpt / "best" / "middle.safetensors"))

    bar = None
    if progress and steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="distilling", unit="step")
    t0 = time.perf_counter()
    captured_t: dict[int, torch.Tensor] = {}
    captured_s: dict[int, torch.Tensor] = {}
    stop_after = max(matched.values())

    def t_hook(idx):
        def hook(_m, _i, out):
            if idx in matched.values():
                captured_t[idx] = _block_output(out).detach()
            if idx == stop_after and kl_weight == 0:
                raise _StopForward

        return hook

    def s_hook(pos):
        def hook(_m, _i, out):
            captured_s[pos] = _block_output(out)

        return hook

    hooks = [teacher_blocks[i].register_forward_hook(t_hook(i)) for i in sorted(set(matched.values()))]
    hooks += [emu_blocks[p].register_forward_hook(s_hook(p)) for p in matched]
    try:
        for step in range(start, steps):
            emulator.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ids, labels, mask = batch_at(train, step, batch_size, seed)
            captured_t.clear()
            captured_s.clear()
            t_final = None
            with torch.no_grad():
                try:
                    out = teacher.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
                    t_final = out.last_hidden_state
                except _StopForward:
                    pass
            s_hidden = emulator.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            nll, n = lm_nll_from_hidden(emulator.get_output_embeddings(), s_hidden, labels)
            lm = nll / max(n, 1)
            keep = mask.bool()
            mse = sum(_normalised_mse(captured_s[p], captured_t[o], keep) for p, o in matched.items()) / len(matched)
            loss = lm_weight * lm + mse_weight * mse
            kl = None
            if kl_weight:
                kl = _chunked_kl(
                    emulator.get_output_embeddings(), teacher.model.get_output_embeddings(), s_hidden, t_final, keep
                )
                loss = loss + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(
                {
                    "loss": float(loss.detach()),
                    "lm": float(lm.detach()),
                    "mse": float(mse.detach()),
                    **({"kl": float(kl.detach())} if kl is not None else {}),
                }
            )
            done = step + 1
            if bar:
                bar.update(1)
                bar.set_postfix(lm=f"{losses[-1]['lm']:.3f}", mse=f"{losses[-1]['mse']:.4f}")
            if on_progress:
                on_progress(done / steps, f"distilling: step {done}/{steps}, LM loss {losses[-1]['lm']:.3f}")
            if done % eval_every == 0 or done == steps:
                consider_best(done, evaluate())
            if done % checkpoint_every == 0 or done == steps:
                save_checkpoint(done)
    finally:
        for h in hooks:
            h.remove()
        if bar:
            bar.close()
        _remove_fake_quant(fq_linears)
        for p in emulator.parameters():
            p.requires_grad_(False)
        emulator.eval()
    ppl_final = last_ppl[-1] if last_ppl else best_ppl
    if best_state is not None:
        with torch.no_grad():
            params = dict(emulator.named_parameters())
            for n, t in best_state.items():
                key = n.replace(".parametrizations.weight.original", ".weight")
                params[key if key in params else n].copy_(t)
    seconds = time.perf_counter() - t0
    ran = steps - start
    return {
        "steps": steps,
        "best_step": best_step,
        "best_ppl": best_ppl,
        "ppl_before": ppl_before,
        "ppl_final": ppl_final,
        "losses": losses,
        "seconds": seconds,
        "s_per_step": seconds / ran if ran else 0.0,
        "resumed_from": resumed_from,
        "match": match,
        "qat": bool(fq_linears),
    }


def _normalised_mse(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over real (unpadded) positions divided by the teacher's RMS, as in the paper."""
    s, t = student[keep], teacher[keep]
    rms = t.pow(2).mean().sqrt().clamp(min=1e-6)
    return F.mse_loss(s, t) / rms


def _chunk_kl(head_s, head_t, hs, ht):
    ls = F.log_softmax(head_s(hs).float(), dim=-1)
    with torch.no_grad():
        lt = F.log_softmax(head_t(ht).float(), dim=-1)
    return F.kl_div(ls, lt, log_target=True, reduction="sum")


def _chunked_kl(head_s, head_t, s_hidden, t_hidden, keep) -> torch.Tensor:
    hs, ht = s_hidden[keep], t_hidden[keep]
    total = hs.new_zeros(())
    for i in range(0, hs.shape[0], CHUNK_TOKENS):
        total = total + checkpoint(
            _chunk_kl, head_s, head_t, hs[i : i + CHUNK_TOKENS], ht[i : i + CHUNK_TOKENS], use_reentrant=False
        )
    return total / max(hs.shape[0], 1)


def _write_state(d: Path, trainable: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
    save_file({n: p.detach().contiguous() for n, p in trainable.items()}, str(d / "middle.safetensors"))
    moments, steps = {}, {}
    names = {id(p): n for n, p in trainable.items()}
    for p, st in opt.state.items():
        n = names[id(p)]
        moments[f"{n}::exp_avg"] = st["exp_avg"].contiguous()
        moments[f"{n}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        steps[n] = float(st["step"])
    save_file(moments, str(d / "optimizer.safetensors"), metadata={"steps": json.dumps(steps)})


def _load_checkpoint(
    d: Path, emulator: nn.Module, trainable: dict[str, torch.Tensor], opt: torch.optim.Optimizer
) -> None:
    from safetensors import safe_open

    weights = load_file(str(d / "middle.safetensors"))
    if set(weights) != set(trainable):
        raise DistillError(
            f"{d}: the checkpoint's tensors do not match this emulator's middle; delete {d.parent} to start over"
        )
    with torch.no_grad():
        for n, t in weights.items():
            trainable[n].copy_(t)
    with safe_open(str(d / "optimizer.safetensors"), framework="pt") as fh:
        steps = json.loads((fh.metadata() or {}).get("steps", "{}"))
        for n, p in trainable.items():
            if n in steps:
                opt.state[p] = {
                    "step": torch.tensor(steps[n]),
                    "exp_avg": fh.get_tensor(f"{n}::exp_avg"),
                    "exp_avg_sq": fh.get_tensor(f"{n}::exp_avg_sq"),
                }


def _diff(a: dict | None, b: dict) -> str:
    if not isinstance(a, dict):
        return "unreadable metadata"
    keys = [k for k in b if a.get(k) != b[k]]
    return "differs in " + ", ".join(keys) if keys else "same settings"
