"""Loss elevation (after LLEOT): lift the emulator's loss a margin above the full model's
near any adapter, while the adapter's gradient stays the full model's.

After the lossy step (e.g. 4-bit AWQ), a small part of the emulator (the gains of the
middle blocks' norms: cheap to store, no low-bit weight changes) is trained to minimise

    E_{a'} | L_emulator(a') - L_full(a') - H |

over proxy adapters a': the pretrained adapter, noised copies of it, and checkpoints of a
short adapter fine-tune on the full model (the region a data owner's training visits).
Pushing the loss up without the margin ruins transfer (LLEOT); the margin is what keeps
the loss surface parallel to the full model's. The margin is enforced only near the
proxies: a data owner who retrains the norms can undo it (the bench measures exactly that).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from .data import TokenBlocks
from .families import Family
from .losses import causal_lm_nll
from .split import SplitPlan


class ElevationError(ValueError):
    """An elevation option that cannot work; the message names it and the fix."""


@dataclass(frozen=True)
class ElevationConfig:
    margin: float = 0.4  # H, in nats per token
    steps: int = 24
    lr: float = 5e-3
    noised_proxies: int = 2
    noise: float = 0.02  # std of the proxy noise, relative to each tensor's std
    finetune_checkpoints: tuple[int, ...] = (4, 8)  # adapter steps on the full model kept as proxies
    finetune_lr: float = 2e-4
    batch_size: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.margin < 0:
            raise ElevationError(f"elevation margin {self.margin} must be >= 0 (nats per token, e.g. 0.4)")
        if self.steps < 1:
            raise ElevationError(f"elevation steps {self.steps} must be >= 1 (e.g. 24)")
        if self.noise < 0 or self.noised_proxies < 0:
            raise ElevationError("elevation noise and the number of noised proxies must be >= 0")


def middle_norm_params(emulator, family: Family, plan: SplitPlan) -> dict[str, torch.nn.Parameter]:
    """The norm gains inside the emulator's (lossy) middle blocks."""
    prefixes = tuple(family.block_prefix(p) for p in plan.emulator_positions)
    out = {}
    for mname, mod in emulator.named_modules():
        if mname.startswith(prefixes) and "norm" in type(mod).__name__.lower():
            for pname, p in mod.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = p
    if not out:
        raise ElevationError(
            "the emulator's middle blocks hold no norm parameters to elevate; this family is not supported"
        )
    return out


def adapter_state(model, family: Family, block_indices: list[int]) -> dict[str, torch.Tensor]:
    """Adapter parameters of `model` keyed by position-free names: (adapter slot, rest)."""
    out = {}
    for slot, idx in enumerate(block_indices):
        prefix = family.block_prefix(idx)
        for n, p in model.named_parameters():
            if n.startswith(prefix):
                out[f"{slot}.{n[len(prefix) :]}"] = p.detach().clone()
    return out


@torch.no_grad()
def load_adapter(model, family: Family, block_indices: list[int], state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, t in state.items():
        slot, rest = key.split(".", 1)
        params[family.block_prefix(block_indices[int(slot)]) + rest].copy_(t)


def proxy_adapters(
    full, family: Family, full_adapter_idx: list[int], train: TokenBlocks, cfg: ElevationConfig
) -> list[dict]:
    """The pretrained adapter, `noised_proxies` noised copies, and checkpoints of a short
    adapter fine-tune on the full model (the full model is restored afterwards)."""
    base = adapter_state(full, family, full_adapter_idx)
    gen = torch.Generator().manual_seed(cfg.seed)
    proxies = [base]
    for _ in range(cfg.noised_proxies):
        proxies.append(
            {
                k: v + cfg.noise * v.std().clamp(min=1e-8) * torch.randn(v.shape, generator=gen)
                if v.numel() > 1
                else v.clone()
                for k, v in base.items()
            }
        )
    if cfg.finetune_checkpoints:
        model = copy.deepcopy(full)
        prefixes = tuple(family.block_prefix(i) for i in full_adapter_idx)
        params = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
        model.train()
        batches = iter(())
        for step in range(1, max(cfg.finetune_checkpoints) + 1):
            try:
                ids, labels, mask = next(batches)
            except StopIteration:
                batches = train.batches(cfg.batch_size, generator=gen, shuffle=True)
                ids, labels, mask = next(batches)
            nll, n = causal_lm_nll(model, ids, labels, mask)
            opt.zero_grad(set_to_none=True)
            (nll / max(n, 1)).backward()
            opt.step()
            if step in cfg.finetune_checkpoints:
                proxies.append(adapter_state(model, family, full_adapter_idx))
        del model
    return proxies


def elevate_emulator(
    full, emulator, family: Family, plan: SplitPlan, train: TokenBlocks, cfg: ElevationConfig, progress: bool = False
) -> dict:
    """Train the emulator's middle norm gains in place so that its loss sits `cfg.margin`
    nats above the full model's for every proxy adapter. `emulator` must be a plain-Linear
    model (dequantize a QuantLinear emulator into a working copy and copy the norms back,
    see `elevate_into`). Returns a report: the gap before/after and the loss curve."""
    cfg.validate()
    full_idx = plan.adapter_origin
    proxies = proxy_adapters(full, family, full_idx, train, cfg)
    saved_full = adapter_state(full, family, full_idx)
    saved_emu = adapter_state(emulator, family, plan.adapter_positions)
    params = middle_norm_params(emulator, family, plan)
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    emulator.eval()  # no dropout: the two losses must be comparable
    curve, gaps, t0, batches = [], [], time.perf_counter(), iter(())
    try:
        for step in range(cfg.steps):
            try:
                ids, labels, mask = next(batches)
            except StopIteration:
                batches = train.batches(cfg.batch_size, generator=gen, shuffle=True)
                ids, labels, mask = next(batches)
            proxy = proxies[step % len(proxies)]
            load_adapter(full, family, full_idx, proxy)
            load_adapter(emulator, family, plan.adapter_positions, proxy)
            with torch.no_grad():
                s, n = causal_lm_nll(full, ids, labels, mask)
                l_full = s / max(n, 1)
            s, n = causal_lm_nll(emulator, ids, labels, mask)
            gap = s / max(n, 1) - l_full
            loss = (gap - cfg.margin).abs()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
            gaps.append(float(gap.detach()))
            if progress and (step % 8 == 0 or step == cfg.steps - 1):
                print(
                    f"[elevate H={cfg.margin}] step {step + 1}/{cfg.steps} gap {gaps[-1]:.3f} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    finally:
        load_adapter(full, family, full_idx, saved_full)
        load_adapter(emulator, family, plan.adapter_positions, saved_emu)
        for p in emulator.parameters():
            p.requires_grad_(False)
    k = max(1, len(gaps) // 4)
    return {
        "margin": cfg.margin,
        "proxies": len(proxies),
        "gap_start": gaps[0],
        "gap_end": sum(gaps[-k:]) / k,
        "loss_curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def elevate_into(
    full, emulator, family: Family, plan: SplitPlan, train: TokenBlocks, cfg: ElevationConfig, progress: bool = False
) -> dict:
    """`elevate_emulator` for an emulator whose middle may hold QuantLinears: elevate a
    dequantized working copy, then copy the trained norm gains back (the low-bit weights
    are untouched)."""
    from .quantize import dequantize_module

    work = copy.deepcopy(emulator)
    dequantize_module(work)
    report = elevate_emulator(full, work, family, plan, train, cfg, progress)
    src = middle_norm_params(work, family, plan)
    dst = middle_norm_params(emulator, family, plan)
    with torch.no_grad():
        for n, p in dst.items():
            p.copy_(src[n])
    return report
