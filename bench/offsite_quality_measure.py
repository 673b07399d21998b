"""The emulator-quality bench's measurements (bench/offsite_quality.py runs them).

Each part (the baselines of one seed, each data owner of one configuration and seed, the
bundle size) is computed once and cached in the bench's --cache-dir as JSON under a hash of
what made it (model digest, protocol, held-out sets, configuration), so an interrupted run
resumes and a new configuration costs only itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from offsite.files import atomic_write

from bench.common import Protocol, adapter_block_indices, train_blocks
from bench.emulator_configs import EmulatorConfig, build_emulator, emulator_bytes
from bench.protection import measure_owners, ppl_on


def cache_path(cache_dir: Path, kind: str, payload: dict) -> Path:
    h = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{kind}-{h}.json"


def cached_result(cache_dir: Path | None, kind: str, payload: dict, compute):
    if cache_dir is None:
        return compute()
    path = cache_path(cache_dir, kind, payload)
    if path.exists():
        stored = json.loads(path.read_text())
        stored.pop("config", None)
        return stored
    if compute is None:  # --cached-only
        return None
    result = compute()
    atomic_write(path, json.dumps({**result, "config": payload}, indent=1))
    return result


def measure_config(
    loaded,
    cfg: EmulatorConfig,
    train,
    sets: dict,
    proto: Protocol,
    cached=None,
    progress: bool = True,
    owner_lr: dict | None = None,
) -> dict:
    """Build `cfg` (only if some owner is not cached), then let the three data owners
    train on it (bench.protection); `cached(part, compute)` stores each part as it ends."""
    from offsite.emulators.quantize import dequantize_module

    cached = cached or (lambda _part, compute: compute())
    info: dict = {}

    def emulator():
        emu, plan, build_s = build_emulator(loaded, cfg, train, sets["own_domain"], proto, progress)
        info.update(emulator_bytes=emulator_bytes(emu, loaded.family, plan, cfg), build_seconds=build_s)
        # QuantLinear dequantizes every forward; folding the same values into plain Linears
        # gives the same function (tests check it), saves the harness time, and is what the
        # full-fine-tuning owner trains.
        dequantize_module(emu)
        if progress:
            print(f"[{cfg.name}] built in {build_s:.0f}s", flush=True)
        return emu

    from offsite.emulators.split import plan_split

    plan = plan_split(
        loaded.family.num_layers(loaded.model.config), proto.adapter_layers, cfg.emulator_layers, cfg.kept
    )
    row = measure_owners(
        loaded,
        emulator,
        plan,
        train,
        sets,
        proto.steps,
        proto.lr,
        proto.batch_size,
        proto.seed,
        label=f"{cfg.name}/seed{proto.seed}",
        cached=cached,
        owner_lr=owner_lr,
    )
    size = cached("size", lambda: info if info else _size_only(loaded, cfg, train, sets, proto)) or {}
    return {**row, **size, "kept": plan.middle_kept}


def _size_only(loaded, cfg, train, sets, proto) -> dict:
    emu, plan, build_s = build_emulator(loaded, cfg, train, sets["own_domain"], proto, False)
    return {"emulator_bytes": emulator_bytes(emu, loaded.family, plan, cfg), "build_seconds": build_s}


def measure_baselines(
    loaded, train, sets: dict, proto: Protocol, cache_dir, key, progress=True, with_full=True, with_ceiling=True
) -> dict:
    out = {}
    out["full_zero_shot"] = cached_result(
        cache_dir, "zero-shot-v2", key, lambda: {"ppl_by_set": ppl_on(loaded.model, sets)}
    )

    def trained_copy(blocks, lr: float, label: str):
        # the adapter ceiling (blocks = the adapter's) and full fine-tuning (None: every block)
        m = copy.deepcopy(loaded.model)
        tr = train_blocks(
            m,
            loaded.family,
            blocks,
            train,
            proto.steps,
            lr,
            proto.batch_size,
            proto.seed,
            progress=label if progress else None,
        )
        return {"ppl_by_set": ppl_on(m, sets), "s_per_step": tr["s_per_step"]}

    if with_ceiling:
        n = loaded.family.num_layers(loaded.model.config)
        blocks = adapter_block_indices(n, proto.adapter_layers)
        out["adapter_ceiling"] = cached_result(
            cache_dir, "ceiling-v2", key, lambda: trained_copy(blocks, proto.lr, "ceiling")
        )
    if with_full:
        out["full_finetuned"] = cached_result(
            cache_dir, "full-ft-v2", {**key, "lr": proto.full_lr}, lambda: trained_copy(None, proto.full_lr, "full-ft")
        )
    for v in out.values():
        v["ppl"] = v["ppl_by_set"]["own_domain"]  # the key older readers use
    return out
